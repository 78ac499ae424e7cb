"""The DICOM Conformance Statement (PS3.2), written from the router's own tables: the presentation
contexts the listener really accepts (`receive.scp.listening_ae`), the transfer syntaxes each
outbound syntax proposes (`codecs.registry`, `forward.association.contexts_for`), the
de-identification profile and options (`codecs.deidentify`), the audit events (`audit`)
and, with a configuration, the site's AE title, destinations and rules. A change in any of them
changes the statement; `docs/conformance-statement.md` is its output for the default
configuration, and a test fails when the two differ.
"""

from __future__ import annotations

from importlib import metadata

from router.config import Commitment, Listen, Loaded

_ROLE = {(True, False): "SCU", (False, True): "SCP", (True, True): "SCU and SCP"}


def _name(uid: str) -> str:
    """pydicom's name for `uid`, else pynetdicom's keyword for a storage class it knows."""
    import re

    from pydicom.uid import UID
    from pynetdicom import sop_class

    name = UID(uid).name
    if name and name != uid:
        return name
    keyword = {v: k for k, v in sop_class._STORAGE_CLASSES.items()}.get(uid)
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword) if keyword else "(private or unknown)"


def _version() -> str:
    try:
        return metadata.version("dicom-router")
    except metadata.PackageNotFoundError:
        return "unknown"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out + [""]


def statement(cfg: Loaded | None = None) -> str:
    """The statement, Markdown; for the default configuration without `cfg`."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from router.codecs import deidentify, registry
    from router.commitment.messages import STORAGE_COMMITMENT
    from router.forward.association import contexts_for
    from router import audit
    from router.receive.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
    from router.receive.scp import listening_ae
    from router.uids import UNCOMPRESSED, VERIFICATION

    listen = cfg.router.listen if cfg is not None else Listen()
    commitment = cfg.router.commitment if cfg is not None else Commitment()
    ae = listening_ae(listen, commitment.mode)
    contexts = ae.supported_contexts
    storage = sorted({cx.abstract_syntax for cx in contexts
                      if cx.abstract_syntax not in (VERIFICATION, STORAGE_COMMITMENT)}, key=_name)
    syntaxes = sorted({ts for cx in contexts if cx.abstract_syntax in storage for ts in cx.transfer_syntax},
                      key=lambda u: (u not in UNCOMPRESSED, [int(p) for p in u.split(".")]))
    committing = [cx for cx in contexts if cx.abstract_syntax == STORAGE_COMMITMENT]
    version = _version()
    site = f" for {listen.ae_title}" if cfg is not None else ""
    lines: list[str] = [
        f"# DICOM Conformance Statement: dicom-router {version}{site}",
        "",
        "Written by `dicom-router conformance" + (" --config FILE`" if cfg is not None else "`") +
        " from the router's own tables" + (
            f" and the configuration `{cfg.path.name}`." if cfg is not None else
            " for the default configuration (`docs/conformance-statement.md`)."),
        "",
        "## 1 Overview",
        "",
        "dicom-router is a store-and-forward router: it receives composite instances as a Storage SCP,",
        "keeps each one durably (the modality hears success only once it is), and forwards it to each",
        "destination its rules name, as a Storage SCU (DIMSE C-STORE) or as a STOW-RS user agent",
        "(DICOMweb), in the transfer syntax the rules choose, with retries. It offers Storage",
        "Commitment to modalities. It has no query/retrieve, worklist or media services.",
        "",
    ]
    network = [
        ["Verification", VERIFICATION, "Yes", "Yes"],
        ["Storage (every class in 2.2.2)", "(see 2.2.2)", "Yes", "Yes"],
    ]
    if committing:
        network.append(["Storage Commitment Push Model", STORAGE_COMMITMENT,
                        "Yes (relay mode)" if commitment.mode == "relay" else "No", "Yes"])
    lines += _table(["SOP class", "UID", "User of service (SCU)", "Provider of service (SCP)"], network)
    lines += [
        "## 2 Networking",
        "",
        "### 2.1 Implementation model",
        "",
        "One application entity, the router (AE title `" + listen.ae_title + "`), in several processes:",
        "",
        "- receiving processes accept associations on one port, write each received data set to the",
        "  spool and commit its jobs (one per destination whose rules take it) in the queue, then answer",
        "  the C-STORE;",
        "- a forwarding process claims jobs, transcodes each instance for its destination (codec worker",
        "  processes), sends it (C-STORE on associations it initiates, or STOW-RS requests) and records",
        "  the outcome; it also sends storage commitment reports and, in relay mode, asks the",
        "  destinations' storage commitment SCPs.",
        "",
        "```",
        "modality --C-STORE/N-ACTION--> [receive] -> spool + queue -> [forward] --C-STORE--> PACS",
        "modality <--N-EVENT-REPORT---- [report]                     [forward] --STOW-RS--> DICOMweb",
        "```",
        "",
        "### 2.2 AE specification",
        "",
        "#### 2.2.1 Association policies",
        "",
    ]
    lines += _table(["Item", "Value"], [
        ["AE title", f"`{listen.ae_title}` (`[listen] ae_title`); the called AE title must match: "
                     f"{'yes' if listen.require_called_ae_title else 'no'}"],
        ["Port", f"{listen.port} (`[listen] port`)"],
        ["Application context", "1.2.840.10008.3.1.1.1"],
        ["Maximum PDU size received", f"{listen.max_pdu} bytes" if listen.max_pdu else "unlimited"],
        ["Simultaneous associations accepted", f"{listen.max_associations} per receiving process"],
        ["Asynchronous operations", "not supported (one operation at a time per association)"],
        ["Implementation Class UID", PYNETDICOM_IMPLEMENTATION_UID],
        ["Implementation Version Name", PYNETDICOM_IMPLEMENTATION_VERSION],
        ["Callers accepted", "the calling AE titles (and addresses) in `[listen] allowed_callers`"
         if listen.allowed_callers else "any calling AE title (`[listen] allowed_callers` empty)"],
        ["Timeouts", f"ACSE {listen.acse_timeout_s:g} s, DIMSE {listen.dimse_timeout_s:g} s, network "
                     f"{listen.network_timeout_s:g} s, request {listen.request_timeout_s:g} s"],
    ])
    lines += [
        "#### 2.2.2 Association acceptance policy",
        "",
        "##### Verification SCP",
        "",
        "C-ECHO is answered 0x0000 (Success).",
        "",
        "##### Storage SCP",
        "",
        f"Each C-STORE is answered 0x{SUCCESS:04X} (Success) once the data set is written to disk, synced, and",
        "its jobs are committed in the queue; the data set is kept as received (header and pixels), each",
        "destination getting its own copy as its rules say. Other statuses:",
        "",
    ]
    lines += _table(["Status", "Meaning"], [
        [f"0x{OUT_OF_RESOURCES:04X}", "Refused: out of resources (disk below `[storage] min_free_mb`, spool or queue "
                                      "not writable); the modality may send again later"],
        [f"0x{CANNOT_UNDERSTAND:04X}", "Cannot understand: a data set that cannot be read, larger than "
                                       "`[listen] max_instance_mb`, or whose SOP Class, SOP Instance, Study or "
                                       "Series Instance UID is not a valid UI value"],
    ])
    lines += [
        "The storage SOP classes accepted, each with every transfer syntax of 2.2.4, SCP role:",
        "",
    ]
    lines += _table(["SOP class", "UID"], [[_name(uid), uid] for uid in storage])
    if listen.accept_unknown_sop_classes:
        lines += ["Any other SOP class proposed is accepted as a storage SOP class (a private or newer class),",
                  "except the non-storage services pynetdicom knows (query/retrieve, worklist, print...):",
                  "`[listen] accept_unknown_sop_classes = false` restricts the SCP to the table above.", ""]
    else:
        lines += ["No other SOP class is accepted (`[listen] accept_unknown_sop_classes = false`).", ""]
    if committing:
        roles = _ROLE[(bool(committing[0].scu_role), bool(committing[0].scp_role))] \
            if committing[0].scu_role is not None else "SCP"
        meaning = {"delivered": "every destination the rules send it to has stored it",
                   "relay": "every destination has stored it and each destination with a storage commitment "
                            "SCP has committed it (the router asks it as an SCU)",
                   "spooled": "it is durable in the router"}[commitment.mode]
        lines += [
            "##### Storage Commitment Push Model SCP",
            "",
            f"N-ACTION (Request Storage Commitment) is accepted; `[commitment] mode = \"{commitment.mode}\"`:",
            f"an instance is reported committed once {meaning}; otherwise failed, with a Failure",
            "Reason, after `[commitment] timeout_s`. The report (N-EVENT-REPORT, Event Type 1 or 2) is sent",
            "on the request's association while it is open, else on a new association to the modality's",
            "address in `[commitment] modalities`. Roles: " + roles + "; transfer syntaxes: " +
            ", ".join(_name(ts) for ts in committing[0].transfer_syntax) + ".",
            "",
        ]
    else:
        lines += ["Storage Commitment is not offered (`[commitment] mode = \"off\"`).", ""]
    lines += [
        "#### 2.2.3 Association initiation policy",
        "",
        "##### Storage SCU (DIMSE destinations)",
        "",
        "For each destination, the forwarding process opens associations as `" + listen.ae_title + "` (at most",
        "the destination's `max_associations`), proposing for each SOP class it has to send one",
        "presentation context per transfer syntax below, and Verification. An instance is sent in the",
        "syntax its rule chose if the destination accepts it, else decompressed (Explicit, then Implicit VR",
        "Little Endian), never dropped. A C-STORE status of Success or Warning is delivered; Failure",
        "statuses are retried or kept as dead letters as the destination's `statuses` say.",
        "",
    ]
    rows = []
    for syntax in registry.all_syntaxes():
        proposed = contexts_for("x", set(syntax.uids))["x"]
        order = sorted(proposed, key=lambda u: (u in UNCOMPRESSED, u))
        rows.append([f"`{syntax.name}`", syntax.title or "as received",
                     "lossy" if syntax.lossy else "lossless",
                     ("the received syntax, " if syntax.name == "original" else "") +
                     ", ".join(f"{_name(u)} ({u})" for u in order)])
    lines += _table(["Rule syntax", "Output", "Pixels", "Transfer syntaxes proposed"], rows)
    lines += [
        "Lossy output gets Lossy Image Compression (0028,2110) 01, its ratio and method appended to",
        "(0028,2112) and (0028,2114), Image Type DERIVED, a Derivation Description and (unless",
        "`keep_sop_instance_uid`) a new SOP Instance UID with the source in the Source Image Sequence.",
        "Already-lossy input is never encoded again with a lossy codec. Lossless output is verified",
        "bit for bit before it is sent (`verify`).",
        "",
    ]
    if commitment.mode == "relay" or cfg is None:
        lines += [
            "##### Storage Commitment Push Model SCU (relay mode)",
            "",
            "With `[commitment] mode = \"relay\"`, the router sends N-ACTION (Request Storage Commitment) to",
            "each destination with `commitment` set, with the SOP Instance UIDs as sent, and accepts its",
            "N-EVENT-REPORT on that association or on a new one (SCP role for the SOP class, negotiated by",
            "SCP/SCU Role Selection), only from that destination's AE title and address.",
            "",
        ]
    lines += [
        "##### STOW-RS user agent (DICOMweb destinations)",
        "",
        "A destination with `url` gets `POST {url}/studies` (PS3.18 10.5), `Content-Type: multipart/related;",
        "type=\"application/dicom\"`, one part per instance with `transfer-syntax=` in its `Content-Type`",
        "(unless `part_transfer_syntax` says otherwise), `Accept: application/dicom+json`, at most",
        "`instances_per_request` instances and `max_request_mb` per request, `max_requests` at once. An",
        "instance is delivered only when the response's Referenced SOP Sequence (0008,1199) lists it;",
        "415 or a Failure Reason 0xC122 makes the router send it again decompressed. Authentication:",
        "HTTP Basic, a bearer token, or OAuth2 client credentials; TLS always verifies the server.",
        "",
        "#### 2.2.4 Transfer syntaxes accepted (Storage and Verification SCP)",
        "",
    ]
    lines += _table(["Transfer syntax", "UID"], [[_name(ts), ts] for ts in syntaxes])
    lines += [
        "#### 2.2.5 Extended negotiation",
        "",
        "SCP/SCU Role Selection for Storage Commitment in relay mode (the router accepts the SCU role, so",
        "that a destination may report on a new association). No other extended negotiation.",
        "",
        "### 2.3 Network interfaces",
        "",
        "TCP/IP. DICOM TLS (PS3.15 B.1, The Basic TLS Secure Transport Connection Profile): TLS 1.2 or",
        "later, on the listener with `[listen] tls` (a client certificate required with",
        "`require_peer_cert`), to destinations and modalities with their own `tls`; the cipher suites",
        "are the Python `ssl` module's defaults for TLS 1.2 and 1.3 (forward secrecy, AEAD).",
        "",
    ]
    if cfg is not None:
        lines += ["### 2.4 This site's destinations", ""]
        rows = []
        for dest in cfg.destinations:
            d = dest.destination
            rule_syntaxes = ", ".join(sorted({r.syntax for r in dest.rules} | {r.fallback for r in dest.rules
                                                                               if r.fallback}))
            deid = "yes" if any(r.deidentify for r in dest.rules) else "no"
            rows.append([dest.name, "STOW-RS" if d.protocol == "dicomweb" else "C-STORE", d.address, rule_syntaxes,
                         deid])
        lines += _table(["Destination", "Protocol", "Address", "Rule syntaxes", "De-identified"], rows) \
            if rows else ["No destination is configured.", ""]
    lines += [
        "## 3 Media interchange",
        "",
        "Not supported.",
        "",
        "## 4 Support of character sets",
        "",
        "Every character set of PS3.5 is accepted and forwarded unchanged: the router does not convert text",
        "and does not change Specific Character Set (0008,0005). Values set by header rules are written as",
        "given; a site using another repertoire than the default one sets them in that repertoire.",
        "",
        "## 5 Security",
        "",
        "- Association control: `[listen] allowed_callers` (calling AE titles, optionally with the",
        "  source addresses allowed for each); the called AE title checked.",
        "- DICOM TLS as in 2.3.",
        "- Attribute confidentiality (PS3.15 Annex E): a rule's `deidentify` applies the Basic Application",
        f"  Level Confidentiality Profile (Table E.1-1, {deidentify.EDITION} edition) to what leaves for its destination,",
        "  with the options:",
        "",
    ]
    lines += _table(["Option (rule file)", "PS3.15 option", "Code (DCM)"],
                    [[f"`{name}`", title, code] for name, (_, code, title) in deidentify.OPTIONS.items()])
    lines += [
        "  New UIDs are `2.25.` and a keyed hash of the original; Patient Identity Removed (0012,0062) is YES,",
        "  De-identification Method (0012,0063) and its Code Sequence (0012,0064) name the profile and",
        "  options; images whose pixels may carry identity are refused unless `burned_in = \"allow\"`.",
        "- Audit trail (IHE ATNA, PS3.15 A.5): with `[audit] url`, audit messages (RFC 5424 syslog over",
        "  TLS, TCP or UDP) for these events:",
        "",
    ]
    lines += _table(["Event", "EventID", "When"], [[e.title, f"{e.code} ({e.meaning})", e.when] for e in audit.EVENTS])
    lines += [
        "## 6 Configuration items that change conformance",
        "",
    ]
    lines += _table(["Item", "Effect"], [
        ["`[listen] ae_title`, `port`", "the AE title and port of 2.2.1"],
        ["`[listen] allowed_callers`, `require_called_ae_title`", "which associations are accepted"],
        ["`[listen] accept_unknown_sop_classes`", "whether SOP classes outside 2.2.2 are accepted"],
        ["`[listen] max_pdu`, `max_associations`, timeouts", "association parameters of 2.2.1"],
        ["`[listen] tls`, a destination's `tls`", "DICOM TLS"],
        ["`[commitment] mode`", "whether Storage Commitment is offered, and what committed means"],
        ["a destination's `ae_title`/`host`/`port` or `url`", "C-STORE or STOW-RS"],
        ["a rule's `syntax`, `fallback`, `keep_sop_instance_uid`", "the transfer syntaxes proposed, lossy "
                                                                  "bookkeeping"],
        ["a rule's `set`, `template`, `map`, `remove`, `deidentify`", "attributes changed in what is sent"],
        ["`[audit]`", "audit messages"],
    ])
    return "\n".join(lines).rstrip() + "\n"
