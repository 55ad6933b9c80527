"""fastlb: a fast TCP/HTTP load balancer.

`Balancer` is the compiled core (fastlb._core). Setting FASTLB_PURE_PYTHON=1 swaps in the
pure-Python twin (fastlb.core_py), which has the same API and the same picks.
"""
import os

__version__ = "0.1.0"

if os.environ.get("FASTLB_PURE_PYTHON") == "1":
    from fastlb.core_py import ALGORITHMS, Balancer, hash_key
else:
    from fastlb._core import ALGORITHMS, Balancer, hash_key

__all__ = ["ALGORITHMS", "Balancer", "hash_key", "__version__"]
