"""Running fastlb: the worker, the controller, the master and the data paths.

- `worker.py`: `Worker`, one event loop's balancer (pools, data paths, the one sweep, draining),
  `LocalController`, the worker's own controller with `--workers 1`, and `run_worker`, which runs one
  until SIGTERM;
- `datapath.py`: the `DataPath` shape every data path has (tcp on the event loop, the C relay engine,
  HTTP), and the `Sweeper`, the worker's one periodic timer (the worker picks its paths: `build_paths`);
- `controller.py`: the `Controller` the admin API and discovery drive, and what both controllers share;
- `master.py`: the `Master` of `--workers N` (the other `Controller`), and `run`, the entry point.
"""
from fastlb.server.controller import Controller
from fastlb.server.datapath import DataPath, Sweeper
from fastlb.server.master import Master, run
from fastlb.server.worker import LocalController, StartupError, Worker, effective_limits, run_worker, setup_logging

__all__ = ["Controller", "DataPath", "LocalController", "Master", "StartupError", "Sweeper", "Worker",
           "effective_limits", "run", "run_worker", "setup_logging"]
