"""Job bundles, object stores, backends, the worker entry point, MC engines, merge and sizing.

Must not import dicom_node. boto3 only in the aws modules, paramiko only in the ssh module.
"""
