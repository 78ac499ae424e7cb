"""Independent DICOM programs as peers of the router: DCMTK's storescu/echoscu as the modality,
Orthanc and DCMTK's storescp as the PACS and the workstations.

Every program runs on 127.0.0.1 on a port chosen free at run time, with its own temporary
directories, and is stopped by its PID by the test that started it. DCMTK and Orthanc wait
for Nagle's algorithm on loopback (about 40 ms per message) unless TCP_NODELAY=1 is set, so
every process gets it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.peers import free_port, wait_until

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PEER_ENV = dict(os.environ, TCP_NODELAY="1")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb

# storescu proposes only uncompressed syntaxes unless told which compressed one to add;
# a scanner sending a compressed file proposes that file's own syntax
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": [],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
}


def require(*programs: str) -> None:
    """Skip the test, naming the program, when one of `programs` is not installed."""
    for program in programs:
        if program == "Orthanc":
            if ORTHANC is None:
                pytest.skip("Orthanc is not installed (scripts/install-peers.sh installs it)")
        elif shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (scripts/install-peers.sh installs it)")


def stop_pid(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop one process we started, by its PID, waiting a bounded time; SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- the modality ------------------------------------------------------------------------------
def storescu(port: int, files: Iterable[Path], called_ae: str = "ROUTER", calling_ae: str = "MODALITY",
             extra: Iterable[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """Send `files` with DCMTK storescu as a scanner would, one association per transfer syntax.

    Each group proposes only the presentation contexts its files need (`-R`), with the files'
    own transfer syntax. Raises AssertionError with storescu's output when a store fails.
    """
    groups: dict[str, list[Path]] = {}
    for path in files:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(ts, []).append(Path(path))
    result = None
    for ts, paths in groups.items():
        if ts not in STORESCU_PROPOSE:
            raise ValueError(f"storescu cannot propose transfer syntax {ts}")
        cmd = ["storescu", "-aet", calling_ae, "-aec", called_ae, "-R", *STORESCU_PROPOSE[ts],
               "-to", "10", "-ta", "10", "-td", "60", *extra, "127.0.0.1", str(port), *map(str, paths)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=PEER_ENV)
        if result.returncode != 0:
            raise AssertionError(
                f"storescu exited {result.returncode}: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
            )
    assert result is not None, "no files to send"
    return result


def echoscu(port: int, called_ae: str = "ROUTER", calling_ae: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", calling_ae, "-aec", called_ae, "-to", "10", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30, env=PEER_ENV,
    )


# -- the PACS: Orthanc ---------------------------------------------------------------------------
class Orthanc:
    """A private Orthanc: its own storage, index and configuration, on free ports."""

    def __init__(self, directory: Path, ae_title: str = "ORTHANC", users: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.users = users or {}  # HTTP Basic users of the REST API and DICOMweb; none: no authentication
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.storage = directory / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config = directory / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "interop-test",
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": True,
            "OverwriteInstances": False,
            "SaveJobs": False,
            "Plugins": [DICOMWEB_PLUGIN] if Path(DICOMWEB_PLUGIN).exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "TcpNoDelay": True,
        }, indent=2))
        self.log_path = directory / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> Orthanc:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         env=PEER_ENV, cwd=self.directory)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"Orthanc did not answer /system within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_pid(self.proc, sig)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.read()

    def get_json(self, path: str):  # noqa: ANN201
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        return self.get_json("/instances")

    def count(self) -> int:
        return len(self.instances())

    def transfer_syntax(self, instance_id: str) -> str:
        return self.get(f"/instances/{instance_id}/metadata/TransferSyntax").decode().strip()

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def dataset(self, instance_id: str) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.file(instance_id)))

    def by_uid(self) -> dict[str, tuple[str, Dataset]]:
        """SOP Instance UID -> (Orthanc's transfer syntax metadata, the stored file)."""
        out = {}
        for instance_id in self.instances():
            ds = self.dataset(instance_id)
            out[str(ds.SOPInstanceUID)] = (self.transfer_syntax(instance_id), ds)
        return out


@pytest.fixture
def orthanc_factory(tmp_path):
    require("Orthanc")
    started: list[Orthanc] = []

    def make(ae_title: str = "ORTHANC", users: dict[str, str] | None = None) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(started)}", ae_title, users)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def orthanc(orthanc_factory) -> Orthanc:
    return orthanc_factory()


# -- the second PACS and the legacy workstation: DCMTK storescp ---------------------------------
@dataclass
class StoreSCP:
    """DCMTK storescp writing every received object, bit for bit, as a file of its own."""

    directory: Path
    flags: list[str]
    ae_title: str = "STORESCP"
    port: int = 0
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.out = self.directory / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.log_path = self.directory / "storescp.log"

    def start(self, extra: Iterable[str] = (), timeout: float = 15) -> StoreSCP:
        # +uf: a second copy of an instance is a second file, so duplicates can be counted
        cmd = ["storescp", *self.flags, *extra, "-aet", self.ae_title, "-od", str(self.out), "+uf",
               "-dhl", "-ta", "10", "-ts", "30", "-ll", "info", str(self.port)]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
        finally:
            log.close()

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"storescp exited with {self.proc.returncode}:\n{self.log()}")
            return echoscu(self.port, self.ae_title).returncode == 0

        wait_until(listening, timeout, interval=0.1, what=f"storescp on port {self.port}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_pid(self.proc, sig)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))

    def count(self) -> int:
        return len(self.files())

    def by_uid(self) -> dict[str, Dataset]:
        out = {}
        for path in self.files():
            ds = pydicom.dcmread(path)
            out[str(ds.SOPInstanceUID)] = ds
        return out


@pytest.fixture
def storescp(tmp_path):
    """Factory: `storescp("+xa")` starts a storescp with those flags; all stopped at the end."""
    require("storescp", "echoscu")
    started: list[StoreSCP] = []

    def make(*flags: str, ae_title: str = "STORESCP", first_start: Iterable[str] = ()) -> StoreSCP:
        """`first_start`: flags for this first run only (e.g. --sleep-after 1); a restart drops them."""
        scp = StoreSCP(tmp_path / f"storescp{len(started)}", list(flags), ae_title)
        started.append(scp)
        return scp.start(first_start)

    yield make
    for scp in started:
        scp.stop(signal.SIGKILL)


# -- test data -----------------------------------------------------------------------------------
def copy_as_series(sources: list[Path], directory: Path, copies: int, study_uid: str | None = None,
                   series_prefix: str = "") -> list[Path]:
    """Write `copies` of each source with new SOP Instance (and Series) UIDs, one study.

    Pixel data are copied as stored (compressed stays compressed, bit for bit).
    """
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    out = []
    for source in sources:
        series_uid = generate_uid()
        for number in range(1, copies + 1):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            ds.PatientID = "INTEROP"
            ds.PatientName = "Interop^Test"
            path = directory / f"{series_prefix}{source.stem}_{number:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    return out


def pixels(ds: Dataset) -> np.ndarray:
    """Decoded pixel values as the standard defines them (colour as RGB)."""
    return ds.pixel_array


def assert_pixels_equal(original: Dataset, received: Dataset, what: str) -> None:
    a, b = pixels(original), pixels(received)
    assert a.shape == b.shape, f"{what}: shape {b.shape} != original {a.shape}"
    if not np.array_equal(a, b):
        diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
        raise AssertionError(f"{what}: pixels differ in {int((diff > 0).sum())} samples, max {int(diff.max())}")


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# DCMTK / GDCM decoders, independent of the codecs the router uses
_DECODERS = {
    "1.2.840.10008.1.2.4.50": ["dcmdjpeg"],
    "1.2.840.10008.1.2.4.51": ["dcmdjpeg"],
    "1.2.840.10008.1.2.4.57": ["dcmdjpeg"],
    "1.2.840.10008.1.2.4.70": ["dcmdjpeg"],
    "1.2.840.10008.1.2.4.80": ["dcmdjpls"],
    "1.2.840.10008.1.2.4.81": ["dcmdjpls"],
    "1.2.840.10008.1.2.5": ["dcmdrle"],
    "1.2.840.10008.1.2.4.90": ["gdcmconv", "--raw"],
    "1.2.840.10008.1.2.4.91": ["gdcmconv", "--raw"],
}


def decode_elsewhere(ds: Dataset, workdir: Path) -> Dataset:
    """Decompress `ds` with DCMTK (JPEG, JPEG-LS, RLE) or GDCM (JPEG 2000) and read the result.

    Proves the codestream the router wrote is readable by another implementation.
    """
    ts = str(ds.file_meta.TransferSyntaxUID)
    tool = _DECODERS[ts]
    require(tool[0])
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{ds.SOPInstanceUID}.in.dcm"
    dst = workdir / f"{ds.SOPInstanceUID}.out.dcm"
    ds.save_as(src, enforce_file_format=True)
    done = subprocess.run([*tool, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{tool[0]} could not decode {ts}: {done.stdout}{done.stderr}"
    return pydicom.dcmread(dst)


def psnr(original: Dataset, received: Dataset) -> float:
    a = pixels(original).astype(np.float64)
    b = pixels(received).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    peak = float(2 ** int(original.BitsStored) - 1)
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


# -- non-image objects ------------------------------------------------------------------------------
TINY_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 72]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def _common(ds: Dataset, sop_class: str, modality: str, study: Dataset) -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, keyword, study.get(keyword, ""))
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "dicom-router tests"
    if modality != "PR":
        ds.ContentDate = "20240101"
        ds.ContentTime = "120000"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def basic_text_sr(study: Dataset) -> Dataset:
    ds = _common(Dataset(), "1.2.840.10008.5.1.4.1.1.88.11", "SR", study)
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("11528-7", "LN", "Radiology Report")]
    ds.ContinuityOfContent = "SEPARATE"
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    text.TextValue = "No change since the prior study."
    ds.ContentSequence = [text]
    return ds


def grayscale_presentation_state(study: Dataset, image: Dataset) -> Dataset:
    ds = _common(Dataset(), "1.2.840.10008.5.1.4.1.1.11.1", "PR", study)
    ds.Laterality = ""
    ds.ContentLabel = "ROUTER_TEST"
    ds.ContentDescription = "window for soft tissue"
    ds.PresentationCreationDate = "20240101"
    ds.PresentationCreationTime = "120000"
    ds.ContentCreatorName = "Test^Reader"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = image.SOPClassUID
    referenced.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedImageSequence = [referenced]
    ds.ReferencedSeriesSequence = [series]
    area = Dataset()
    area.DisplayedAreaTopLeftHandCorner = [1, 1]
    area.DisplayedAreaBottomRightHandCorner = [int(image.Columns), int(image.Rows)]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelSpacing = [1, 1]
    ds.DisplayedAreaSelectionSequence = [area]
    voi = Dataset()
    voi.WindowCenter = 40
    voi.WindowWidth = 400
    ds.SoftcopyVOILUTSequence = [voi]
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def encapsulated_pdf(study: Dataset) -> Dataset:
    ds = _common(Dataset(), "1.2.840.10008.5.1.4.1.1.104.1", "DOC", study)
    ds.ConversionType = "WSD"
    ds.AcquisitionDateTime = "20240101120000"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Referral"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = TINY_PDF + (b"\0" if len(TINY_PDF) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(TINY_PDF)
    return ds
