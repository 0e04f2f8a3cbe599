"""A minimal RT Dose receiver (a stand-in TPS) for `mcnode demo` and the end-to-end benchmark."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom.uid import RTDoseStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.net import status, uids
from dicom_node.net.scp import set_nodelay

LOGGER = logging.getLogger(__name__)


class DoseReceiver:
    """Accepts RT Dose C-STOREs on 127.0.0.1 and writes them to a folder."""

    def __init__(self, out_dir: Path, ae_title: str = "TPS", port: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.received: list[Path] = []
        self.arrived = threading.Event()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(RTDoseStorage)
        self._ae.add_supported_context(uids.VERIFICATION)
        self._port = port
        self._server: ThreadedAssociationServer | None = None
        self.port = 0

    def _on_store(self, event: Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # the only event this handler is bound to
        path = self.out_dir / f"RD_{request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        self.received.append(path)
        self.arrived.set()
        return status.SUCCESS

    def start(self) -> int:
        server = self._ae.start_server(
            ("127.0.0.1", self._port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, set_nodelay)])
        assert server is not None  # block=False returns the server
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> DoseReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
