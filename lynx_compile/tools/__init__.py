"""The command-line harness around the library: ``lynx-bench``, ``lynx-dump``, the workloads they
load, and the timing and result-file helpers the scripts in ``benchmarks/`` share.

The library (``lynx_compile`` outside this package) never imports from here.
"""
