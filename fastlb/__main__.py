"""`python -m fastlb`: the same as the `fastlb` command."""
import sys

from fastlb.cli import main

sys.exit(main())
