"""The cloud package's exception tree, under the product's one root (anonymizer.errors.McNodeError).
Errors from libraries and subprocesses are converted here.

    CloudError
    ├── EngineError            a Monte Carlo engine could not prepare or run (often retryable)
    │   ├── EngineUnavailable  the engine's binary or data files are missing or do not start here
    │   └── UnsupportedPlan    the plan can never be computed by this engine (photons, electrons,
    │                          ion plans that are not pencil-beam scanning, unsupported CT geometry);
    │                          the message is the reason shown to users and the job is REJECTED
    ├── MergeError             tallies that cannot be merged (missing shards, mismatched grids)
    ├── StoreError             an object store could not put or get an object
    ├── BundleError            a bundle is malformed or does not match its manifest
    └── DispatchError          shards could not be completed (retries exhausted, deadline passed)
        └── Cancelled          the node is stopping; the job stays RUNNING and resumes on restart

The clinic side (``dicom_node``) maps UnsupportedPlan to REJECTED and the rest to FAILED at its boundary.
"""

from anonymizer.errors import McNodeError


class CloudError(McNodeError):
    """Base of every error the cloud package raises on purpose."""


class EngineError(CloudError):
    """A Monte Carlo engine failed to prepare inputs or to run a shard."""


class EngineUnavailable(EngineError):
    """The engine's binary or data files cannot be found or do not start on this machine."""


class UnsupportedPlan(EngineError):
    """The plan can never be computed by this engine; the message is the reason shown to users."""


class MergeError(CloudError):
    """Tallies that cannot be merged into one dose: shards missing or not from the same inputs."""


class StoreError(CloudError):
    """An object store operation failed."""


class BundleError(CloudError):
    """A job bundle is malformed or does not match its manifest."""


class DispatchError(CloudError):
    """Shards could not be completed: the message says which and why."""


class Cancelled(DispatchError):
    """Dispatch was stopped because the node is shutting down; nothing failed."""
