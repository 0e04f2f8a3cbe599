"""The ompMC engine (photons and electrons). Importing this package does not import ``ompmc``.

``ompmc`` (GPL-3.0) is an optional extra (``pip install 'dicom-mc-node[photon]'``); it is imported
only inside ``OmpmcEngine.run_shard``, i.e. in a worker process that was asked to run this engine.
"""
