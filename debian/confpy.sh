#!/bin/sh
# confpy on Debian's python3.11 in its own virtualenv (/usr/lib/confpy). -I: nothing from the
# environment (PYTHONPATH, user site-packages, the current folder) can change what runs as root.
exec /usr/lib/confpy/bin/python3 -I -m confpy "$@"
