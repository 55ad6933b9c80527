"""Named values shared by the compiled modules and Python: the Python twin of fastlb/constants.pxd, which
says what each means (tests/test_constants.py holds the two equal)."""

STICKY_COOKIE_INSERT = 1
STICKY_COOKIE_PREFIX = 2
STICKY_LEARN_COOKIE = 3
STICKY_LEARN_HEADER = 4
STICKY_SOURCE = 5

WAIT_NONE = 0
WAIT_HEAD = 1
WAIT_IDLE = 2
WAIT_BACKEND = 3
WAIT_TUNNEL = 4

PAUSE_BACKEND_FULL = 1
PAUSE_QUEUE = 2

KEY_NONE = 0
KEY_SOURCE = 1
KEY_URI = 2
KEY_PATH = 3

ADMIT = 0
DENIED = 1
TOO_MANY = 2
MAX_KEY_HEADERS = 4
