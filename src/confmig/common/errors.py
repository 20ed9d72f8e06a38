"""The one error root of confmig.

::

    ConfmigError
    ├── ConfigError              bad command line, bad option, bad file
    ├── ProtocolError            bytes from a peer that do not parse (ioctl, QMP, stream, mailbox, key broker)
    │   ├── StreamError          a migration stream that is truncated or corrupt
    │   └── KeyBrokerMessageError  a guest owner's key-broker body (request, reply, error) that does not
    │                              parse or is out of bounds
    ├── StateError               an operation not allowed in the current lifecycle state
    ├── KvmError                 an emulated ioctl failed; carries the negative errno
    ├── MigrationError           a migration failed or was refused
    │   ├── LocalMigrationError  ... because of something on this side
    │   └── RemoteMigrationError ... because the peer failed or went away
    └── IntegrityError           authentication failed (one fixed message, details only in trusted logs)
"""

from __future__ import annotations

import errno as _errno
import os


class ConfmigError(Exception):
    """Root of every error confmig raises on purpose."""


class ConfigError(ConfmigError):
    """Bad user input: command line, option value, file."""


class ProtocolError(ConfmigError):
    """A peer sent bytes that do not form a valid message."""


class StreamError(ProtocolError):
    """The migration stream is truncated or corrupt."""


class KeyBrokerMessageError(ProtocolError):
    """A body of the guest owner's key-broker protocol (``confmig.proto.keybroker``) does not parse."""


class StateError(ConfmigError):
    """An operation was attempted in a lifecycle state that does not allow it."""

    def __init__(self, operation: str, state: object, required: object) -> None:
        super().__init__(f"{operation} not allowed in state {state} (requires {required})")
        self.operation = operation
        self.state = state
        self.required = required


class KvmError(ConfmigError):
    """An emulated KVM ioctl returned an error; ``errno`` is positive, as in ``OSError``."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl}: {name} ({os.strerror(err)})"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.ioctl = ioctl
        self.errno = err


class MigrationError(ConfmigError):
    """A migration failed or was refused."""


class LocalMigrationError(MigrationError):
    """The migration failed on this side."""


class RemoteMigrationError(MigrationError):
    """The peer failed, went away, or sent something we refused."""


class IntegrityError(ConfmigError):
    """Authentication failed. Deliberately opaque: one type, one message."""

    def __init__(self) -> None:
        super().__init__("integrity check failed")
