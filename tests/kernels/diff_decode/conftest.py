"""Fixtures shared by the differential-decode kernel tests."""

import importlib

import pytest


@pytest.fixture
def interp_device(kernel_device):
    """kernel_device, also checking that the Triton decode kernels are interpreted when on the CPU."""
    if kernel_device.type == "cpu":
        ddt = importlib.import_module("sambay.kernels.diff_decode.triton_diff_decode")
        if type(ddt._split_kernel).__name__ != "InterpretedFunction":
            pytest.skip("sambay.kernels.diff_decode.triton_diff_decode was imported before TRITON_INTERPRET=1 was set")
    return kernel_device
