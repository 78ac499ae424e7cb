"""Label lossy output as PS3.3 C.7.6.1.1.5 asks: Lossy Image Compression "01", the ratio and
method appended to (0028,2112) and (0028,2114), Image Type DERIVED, a Derivation Description,
and (unless the destination keeps it) a new SOP Instance UID with the source referenced."""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from router.codecs.registry import Syntax
from router.request import Params


def lossy_bookkeeping(ds: Dataset, syntax: Syntax, ratio: float, params: Params, keep_sop_instance_uid: bool,
                      new_uid: Callable[[str], str] | None = None) -> None:
    """`new_uid`: the new SOP Instance UID made from the one it replaces (a de-identified
    instance's, derived from its secret), by default a random one."""
    ds.LossyImageCompression = "01"
    ratios = _values(ds.get("LossyImageCompressionRatio"))
    methods = _values(ds.get("LossyImageCompressionMethod"))
    ratios.append(_ds_str(ratio))
    methods.append(syntax.method or "")
    ds.LossyImageCompressionRatio = ratios if len(ratios) > 1 else ratios[0]
    ds.LossyImageCompressionMethod = methods if len(methods) > 1 else methods[0]
    image_type = _values(ds.get("ImageType"))
    if image_type:
        image_type[0] = "DERIVED"
    else:
        image_type = ["DERIVED", "SECONDARY"]
    ds.ImageType = image_type if len(image_type) > 1 else image_type[0]
    setting = syntax.describe(params)
    setting = f" {setting}" if setting else ""
    text = f"Lossy compression {syntax.title} ({syntax.method}){setting}, compression ratio {ratio:.2f}:1"
    old = str(ds.get("DerivationDescription", "") or "").strip()
    ds.DerivationDescription = (f"{old}; {text}" if old else text)[:1024]
    if not keep_sop_instance_uid:
        source = Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        purpose = Dataset()
        purpose.CodeValue = "121320"
        purpose.CodingSchemeDesignator = "DCM"
        purpose.CodeMeaning = "Uncompressed predecessor"
        source.PurposeOfReferenceCodeSequence = Sequence([purpose])
        existing = list(ds.get("SourceImageSequence", []) or [])
        ds.SourceImageSequence = Sequence(existing + [source])
        ds.SOPInstanceUID = generate_uid() if new_uid is None else new_uid(str(ds.SOPInstanceUID))


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]  # type: ignore[union-attr]
    return [str(value)]


def _ds_str(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio < 1e10 else f"{ratio:.6g}"
