"""The DICOM wire: the storage receiver (SCP), the sender (SCU), status codes and SOP classes."""
