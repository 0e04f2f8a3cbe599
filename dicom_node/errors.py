"""The node's exception tree, under the product's one root (anonymizer.errors.McNodeError).
Errors from libraries are converted to these at the boundary.

    NodeError
    ├── ConfigError        bad config file, key or command-line value (fails at start)
    ├── SpoolError         an instance could not be written durably
    ├── JournalError       the job journal is unusable
    ├── PlanRejected       the input can never work (the job goes to REJECTED with the reason)
    └── SendError          a C-STORE to a peer did not succeed
"""

from anonymizer.errors import McNodeError


class NodeError(McNodeError):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """A configuration value is missing or wrong; the message names the key."""


class SpoolError(NodeError):
    """An instance could not be stored durably."""


class JournalError(NodeError):
    """The journal database could not be read or written."""


class PlanRejected(NodeError):
    """The plan can never be computed as received; the message is the reason shown to users."""


class SendError(NodeError):
    """Sending to a DICOM peer failed; the message says which files and why."""
