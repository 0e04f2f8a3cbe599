"""The cloud package's exception tree; library errors (boto3, paramiko, OS) are converted here.

    CloudError
    ├── EngineError          the MC engine failed to run
    │   └── UnsupportedPlan  the plan can never be computed by this engine (reason shown to users)
    ├── StoreError           an object store could not put or get an object
    ├── BundleError          a bundle is malformed or does not match its manifest
    └── DispatchError        shards could not be completed (retries exhausted, deadline passed)
        └── Cancelled        the node is stopping; the job stays RUNNING and resumes on restart
"""


class CloudError(Exception):
    """Base of every error the cloud package raises on purpose."""


class EngineError(CloudError):
    """The Monte Carlo engine could not run or produced no usable output."""


class UnsupportedPlan(EngineError):
    """The plan can never be computed by this engine; the message is the reason shown to users."""


class StoreError(CloudError):
    """An object store operation failed."""


class BundleError(CloudError):
    """A job bundle is malformed or does not match its manifest."""


class DispatchError(CloudError):
    """Shards could not be completed: the message says which and why."""


class Cancelled(DispatchError):
    """Dispatch was stopped because the node is shutting down; nothing failed."""
