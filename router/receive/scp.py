"""Receiving: the pynetdicom adapter, and nothing else.

The AE accepts C-ECHO and every storage SOP class in every transfer syntax; the network layer
streams each data set to a file in the spool's `incoming/` without decoding it, and the C-STORE
handler hands that file to `intake.Intake.accept`, whose status it answers. With storage
commitment on, the AE also accepts the Storage Commitment Push Model SOP class, and the
N-ACTION handler hands the request to `commitment.AssociationReports.accept`, whose status it
answers. With `[commitment] mode = "relay"` it also takes the SCU role for that class, which a
destination proposes when it opens an association to send its report (SCP/SCU Role Selection),
and the N-EVENT-REPORT handler hands that report to `relay.record_report`. Association-level
policy (called AE title, allowed callers, the association limit) is here too, since only the
association knows it, and so is what the listener's limits close (`compat.pynetdicom.Limits`):
counted in `dicom_router_rejected_total` and logged.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from router import log, metrics
from router.commitment.messages import STORAGE_COMMITMENT
from router.commitment.reports import AssociationReports
from router.compat.pydicom import teach_jpeg_xl
from router.compat.listener import Cut, GuardedAssociationServer, Hooks, Limits
from router.compat.pynetdicom import register_server, reject_association
from router.config import AllowedCaller, Listen
from router import audit
from router.queue import Instance
from router.receive.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Intake, Received
from router.commitment.accept import record_report
from router.request import Reason
from router.rules import Context
from router.tls import server_context

_log = log.get("scp")


UNBOUNDED_ASSOCIATIONS = 1 << 30


def _in_progress(assoc: Association) -> bool:
    """Whether an association counts against `max_associations`: neither released, aborted nor
    rejected (its threads may still be ending)."""
    return assoc.is_acceptor and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def _caller_allowed(allowed: list[str | AllowedCaller], ae_title: str, address: str) -> bool:
    if not allowed:
        return True
    for entry in allowed:
        if isinstance(entry, str):
            if entry.strip() == ae_title.strip():
                return True
            continue
        if entry.ae_title.strip() != ae_title.strip():
            continue
        if not entry.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if any(ip in ipaddress.ip_network(h, strict=False) for h in entry.hosts):
            return True
    return False


# why the listener closed a connection -> the reason it is counted under
_CUT_REASONS = {
    Cut.REQUEST_TIMEOUT: Reason.TIMEOUT,
    Cut.PDU_TIMEOUT: Reason.TIMEOUT,
    Cut.TLS_TIMEOUT: Reason.TIMEOUT,
    Cut.PDU_TOO_LARGE: Reason.TOO_LARGE,
    Cut.MESSAGE_TOO_LARGE: Reason.TOO_LARGE,
    Cut.NOT_A_REQUEST: Reason.MALFORMED,
    Cut.TLS_FAILED: Reason.NOT_ALLOWED,
    Cut.CROWDED: Reason.BUSY,
}


class _SharedPortServer(GuardedAssociationServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def listening_ae(listen: Listen, commitment_mode: str) -> AE:
    """The AE the router listens as, with every presentation context it accepts: the one table
    the receiving processes and the conformance statement (`operate.conformance`) read.
    `commitment_mode`: [commitment] mode ("off": storage commitment is not offered)."""
    teach_jpeg_xl()  # the AE accepts every transfer syntax, JPEG XL's too
    ae = AE(ae_title=listen.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    if commitment_mode == "relay":
        # modalities ask with the default roles; a destination reporting proposes to be the SCP
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=True, scp_role=True)
    elif commitment_mode != "off":
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.require_called_aet = listen.require_called_ae_title
    # the limit is the EVT_REQUESTED handler's (`Receiver._on_requested`): pynetdicom's own
    # counts every association thread still alive, one released a moment ago included, and
    # refuses a modality that releases and associates again at once (an association per image)
    ae.maximum_associations = UNBOUNDED_ASSOCIATIONS
    ae.maximum_pdu_size = listen.max_pdu
    ae.acse_timeout = listen.acse_timeout_s
    ae.dimse_timeout = listen.dimse_timeout_s
    ae.network_timeout = listen.network_timeout_s
    return ae


class Receiver:
    """The inbound side: owns the pynetdicom AE; every C-STORE goes to `intake`."""

    def __init__(self, listen: Listen, intake: Intake, commitments: AssociationReports | None = None) -> None:
        self.listen = listen
        self.intake = intake
        self.commitments = commitments  # None: storage commitment is not offered
        self.server: GuardedAssociationServer | None = None
        self.port = 0
        # the metrics' `caller` label: the configured callers keep their name, others only up to a bound
        known = {c if isinstance(c, str) else c.ae_title for c in listen.allowed_callers}
        if commitments is not None:
            known |= set(commitments.config.modalities)
        metrics.bound_callers(frozenset(known), listen.max_caller_labels)
        # the audit trail: what each association sent, by study, written when it ends
        self.transfers = audit.Transfers() if audit.current() is not None else None
        if self.transfers is not None:
            intake.on_stored = self._stored

    # -- handlers ----------------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _refuse(self, reason: Reason, why: str, calling: str, address: str) -> None:
        metrics.REJECTED.labels(reason=reason.value).inc()
        _log.warning("association_rejected", reason=why, calling_ae=calling, source_ip=address)
        if reason is Reason.NOT_ALLOWED:
            audit.security_alert(("110132", "Use of Restricted Function"), f"association refused: {why}",
                                 audit.peer_ae(calling, address))

    def _stored(self, received: Received, instance: Instance, patient_id: str, patient_name: str) -> None:
        assert self.transfers is not None
        self.transfers.add(received.association, audit.peer_ae(received.context.calling_ae, received.context.source_ip),
                           instance.study_instance_uid, instance.sop_class_uid, patient_id, patient_name)

    def _on_ended(self, event: evt.Event) -> None:
        if self.transfers is not None:
            self.transfers.end(id(event.assoc))

    def _on_requested(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title
        address = event.assoc.requestor.address
        active = [a for a in event.assoc.ae.active_associations if _in_progress(a)]
        if len(active) > self.listen.max_associations:
            self._refuse(Reason.BUSY, f"more than {self.listen.max_associations} associations", calling, address)
            # rejected-transient, service provider (presentation), local limit exceeded
            reject_association(event.assoc, 0x02, 0x03, 0x02)
            return
        called = event.assoc.requestor.primitive.called_ae_title
        if self.listen.require_called_ae_title and called.strip() != self.listen.ae_title.strip():
            # pynetdicom refuses it (require_called_aet)
            self._refuse(Reason.NOT_ALLOWED, f"called AE title {called.strip()!r} is not ours", calling, address)
            return
        if not _caller_allowed(self.listen.allowed_callers, calling, address):
            self._refuse(Reason.NOT_ALLOWED, "calling AE title or address not allowed", calling, address)
            # rejected-permanent, service-user, calling AE title not recognised
            reject_association(event.assoc, 0x01, 0x01, 0x03)

    def _on_established(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(caller=metrics.caller_label(event.assoc.requestor.ae_title)).inc()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        context = Context(calling_ae=assoc.requestor.ae_title.strip(), called_ae=assoc.acceptor.ae_title.strip(),
                          source_ip=assoc.requestor.address)
        request = event.request
        return self.intake.accept(Received(
            path=Path(event.dataset_path),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            context=context,
            priority=int(request.Priority or 0),
            association=id(assoc),
        ))

    def _on_n_action(self, event: evt.Event) -> tuple[int, None]:
        assert self.commitments is not None  # the SOP class is only offered with it
        try:
            information = event.action_information
        except Exception:  # noqa: BLE001 - undecodable: the request is malformed
            information = None
        calling = event.assoc.requestor.ae_title.strip()
        return self.commitments.accept(event.action_type, information, calling, event.assoc), None

    def _on_n_event_report(self, event: evt.Event) -> tuple[int | Dataset, None]:
        assert self.commitments is not None  # only bound in relay mode
        try:
            information = event.event_information
        except Exception:  # noqa: BLE001 - undecodable: the report is malformed
            information = None
        calling = event.assoc.requestor.ae_title.strip()
        # believed only from the destination asked: its AE title, from its address
        return record_report(self.commitments.queue, event.event_type, information, calling, "new",
                             event.assoc.requestor.address, self.commitments.destinations()), None

    @property
    def relays(self) -> bool:
        """Whether destinations' storage commitment reports are taken (relay mode)."""
        return self.commitments is not None and self.commitments.config.mode == "relay"

    # -- what the listener's limits and guards report ----------------------------------------
    def _on_closed(self, cut: Cut, detail: str, address: str) -> None:
        reason = _CUT_REASONS[cut]
        metrics.REJECTED.labels(reason=reason.value).inc()
        _log.warning("connection_closed", reason=detail, cause=cut.value, source_ip=address)
        if cut is Cut.TLS_FAILED:
            audit.security_alert(("110126", "Node Authentication"), f"TLS handshake failed: {detail}",
                                 audit.Participant(user_id=address or "unknown", requestor=True, address=address))

    def _on_receiving(self, assoc: Association, sop_instance_uid: str, received: int) -> int | None:
        return self.intake.check_receiving(received, assoc.requestor.ae_title.strip(), sop_instance_uid)

    def _on_unwritable(self, assoc: Association, error: Exception) -> int:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            reason, status, why = Reason.DISK_FULL, OUT_OF_RESOURCES, f"cannot write the data set: {error}"
        else:
            reason, status, why = Reason.MALFORMED, CANNOT_UNDERSTAND, f"C-STORE request cannot be used: {error}"
        metrics.REJECTED.labels(reason=reason.value).inc()
        _log.error("store_refused", reason=why, status=f"0x{status:04X}", calling_ae=assoc.requestor.ae_title.strip(),
                   source_ip=assoc.requestor.address)
        return status

    # -- lifecycle ---------------------------------------------------------------------------
    def make_ae(self) -> AE:
        return listening_ae(self.listen, "off" if self.commitments is None else self.commitments.config.mode)

    def start(self, reuse_port: bool = False) -> None:
        """Listen; with `reuse_port`, several processes share the port (SO_REUSEPORT).

        The process must stream received data sets to files
        (`compat.pynetdicom.stream_datasets_to_files`, done by the process's entry point).
        """
        ae = self.make_ae()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        if self.commitments is not None:
            handlers.append((evt.EVT_N_ACTION, self._on_n_action))
        if self.relays:
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_n_event_report))
        if self.transfers is not None:
            handlers += [(evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended),
                         (evt.EVT_CONN_CLOSE, self._on_ended)]
        ssl_context = server_context(self.listen.tls) if self.listen.tls is not None else None
        limits = Limits(
            request_timeout=self.listen.request_timeout_s,
            pdu_timeout=self.listen.pdu_timeout_s,
            max_pdu=self.listen.max_pdu,
            tls_handshake_timeout=self.listen.tls_handshake_timeout_s,
            pending=self.listen.max_associations,  # connections still on their way in, besides the associations
        )
        hooks = Hooks(closed=self._on_closed, receiving=self._on_receiving, unwritable=self._on_unwritable)
        self.server = ae.make_server((self.listen.host, self.listen.port), evt_handlers=handlers,
                                     ssl_context=ssl_context,
                                     server_class=_SharedPortServer if reuse_port else GuardedAssociationServer,
                                     limits=limits, hooks=hooks)
        register_server(ae, self.server)
        threading.Thread(target=self.server.serve_forever, name="dicom-accept", daemon=True).start()
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
