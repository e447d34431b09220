"""A direct call the kernel refused: seb's eBPF programs make ``connect()`` to a protected
API fail with ``EPERM`` for every process but the broker."""

from __future__ import annotations

import errno
import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import DirectEgressRefused

F = TypeVar("F", bound=Callable[..., Any])


def kernel_refusal(error: BaseException) -> Optional[OSError]:
    """The ``EPERM`` from ``connect()`` behind ``error``, if there is one: HTTP libraries
    wrap it (``urllib.error.URLError.reason``, ``__cause__``, ``__context__``)."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.EPERM:
            return current
        reason = getattr(current, "reason", None)
        current = (reason if isinstance(reason, BaseException) else None) or current.__cause__ or current.__context__
    return None


@contextmanager
def broker_only() -> Iterator[None]:
    """Turn a kernel refusal inside the block into ``DirectEgressRefused``, whose message
    tells the agent to go through the broker. Other errors pass unchanged.

    >>> with broker_only():
    ...     urllib.request.urlopen("https://s3.amazonaws.com/")   # doctest: +SKIP
    """
    try:
        yield
    except DirectEgressRefused:
        raise
    except Exception as error:  # noqa: BLE001 - only a kernel refusal is translated
        refusal = kernel_refusal(error)
        if refusal is None:
            raise
        raise DirectEgressRefused(refusal) from error


def broker_only_call(function: F) -> F:
    """Decorator form of ``broker_only``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with broker_only():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
