"""Process limits set once when a command starts."""

from __future__ import annotations

import resource

#: The soft limit on open files a command asks for (at most the hard limit).
OPEN_FILES = 65536


def raise_open_files() -> None:
    """Raise the soft limit on open files towards the hard one, to at most `OPEN_FILES`.

    A push's walk holds one descriptor per level of the tree (a tree 1,100 directories deep
    failed with "Too many open files" under the usual soft limit of 1,024), a stage its
    writers' directories, a daemon its connections. The hard limit is the administrator's
    bound; the soft one only a default, which Go programs, for one, raise the same way.
    Where the limit cannot be read or set, it is left as it is.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
