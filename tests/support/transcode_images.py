"""Real test images from pydicom-data, and edge cases built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

try:
    import data_store

    DATA = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover
    DATA = Path("/nonexistent")

CT = DATA / "693_UNCR.dcm"  # signed, 14 bits stored
MR = DATA / "MR2_UNCR.dcm"  # 12 bits stored
CR = DATA / "RG1_UNCR.dcm"  # 15 bits stored, 7 MB
US = DATA / "US1_UNCR.dcm"  # RGB 8-bit
MULTIFRAME = DATA / "emri_small.dcm"
RGB_2FRAME = DATA / "SC_rgb_2frame.dcm"
BIG_ENDIAN = DATA / "OBXXXX1A_expb.dcm"
BIG_ENDIAN_MF = DATA / "emri_small_big_endian.dcm"
RLE_MF = DATA / "emri_small_RLE.dcm"
JPEG_BASELINE = DATA / "color3d_jpeg_baseline.dcm"
J2K_LOSSY = DATA / "MR2_J2KI.dcm"
J2K_LOSSLESS = DATA / "MR2_J2KR.dcm"
JLS_MF = DATA / "emri_small_jpeg_ls_lossless.dcm"
ONE_BIT = DATA / "liver.dcm"
RGB_32BIT = DATA / "SC_rgb_32bit.dcm"
PALETTE = DATA / "OBXXXX1A.dcm"
YBR_FULL = DATA / "SC_ybr_full_uncompressed.dcm"
TOO_SHORT = DATA / "emri_small_jpeg_2k_lossless_too_short.dcm"


def pixels(path: Path) -> np.ndarray:
    """Pixels as pydicom 3 decodes them (what a viewer built on it shows)."""
    return pydicom.dcmread(path).pixel_array


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _with_pixels(ds: Dataset, arr: np.ndarray) -> Dataset:
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def odd_size(tmp: Path, src: Path = MR) -> Path:
    """A 255 x 253 crop: odd rows and columns."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array[:255, :253]
    ds.Rows, ds.Columns = arr.shape
    return write(_with_pixels(ds, arr), tmp / "odd.dcm")


def high_bits(tmp: Path) -> Path:
    """12-bit MR whose stored words carry an old overlay in bit 14."""
    ds = pydicom.dcmread(MR)
    arr = ds.pixel_array.copy()
    arr[10:20, 10:60] |= 0x4000
    return write(_with_pixels(ds, arr), tmp / "highbits.dcm")


def signed16(tmp: Path) -> Path:
    """Signed 16-bit (Bits Stored 16) from the CT, spread over the full range."""
    ds = pydicom.dcmread(CT)
    arr = ds.pixel_array.astype(np.int32) * 6
    arr = np.clip(arr, -32768, 32767).astype(np.int16)
    ds.BitsStored, ds.HighBit = 16, 15
    return write(_with_pixels(ds, arr), tmp / "signed16.dcm")


def signed12_masked(tmp: Path) -> Path:
    """Signed 12-bit stored without sign extension (high nibble zero), as some modalities write."""
    ds = pydicom.dcmread(CT)
    arr = np.clip(ds.pixel_array, -2048, 2047).astype(np.int16)
    ds.BitsStored, ds.HighBit = 12, 11
    pattern = arr.view(np.uint16) & 0x0FFF
    return write(_with_pixels(ds, pattern), tmp / "signed12.dcm")


def eight_bit_mono(tmp: Path) -> Path:
    """8-bit MONOCHROME2 made from the MR (Bits Allocated 8)."""
    ds = pydicom.dcmread(MR)
    arr = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return write(_with_pixels(ds, arr), tmp / "mono8.dcm")


def lossy_flagged(tmp: Path, src: Path = MR) -> Path:
    """An uncompressed image whose header says it was lossy compressed before."""
    ds = pydicom.dcmread(src)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "8.5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    return write(ds, tmp / "lossy_flagged.dcm")


def no_pixels(tmp: Path) -> Path:
    """A Basic Text SR-like object: no Pixel Data at all."""
    ds = pydicom.dcmread(MR)
    for keyword in ("PixelData",):
        del ds[keyword]
    return write(ds, tmp / "nopixels.dcm")


def float_pixels(tmp: Path) -> Path:
    """Float Pixel Data (7FE0,0008) instead of Pixel Data."""
    ds = pydicom.dcmread(MR)
    arr = ds.pixel_array.astype(np.float32) / 7
    del ds.PixelData
    ds.FloatPixelData = arr.tobytes()
    ds.BitsAllocated, ds.BitsStored = 32, None
    del ds.BitsStored
    del ds.HighBit
    del ds.PixelRepresentation
    return write(ds, tmp / "float.dcm")


def truncated(tmp: Path) -> Path:
    """Native pixel data shorter than Rows x Columns says."""
    ds = pydicom.dcmread(MR)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return write(ds, tmp / "truncated.dcm")


# ---------------------------------------------------------------- edge cases built from scratch

MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
# how each builder below encodes a frame: the transfer syntax and an independent encoder
ICON_SYNTAXES = {
    "explicit-le": "1.2.840.10008.1.2.1",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "rle": "1.2.840.10008.1.2.5",
}


def _image_dataset(sop_class: str, uid: str) -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Edge^Case", "EDGE", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def _set_image(ds: Dataset, frames: list[np.ndarray], bits_stored: int, photometric: str = "MONOCHROME2") -> None:
    """Image Pixel module attributes of ``frames`` (all of one shape) on ``ds``."""
    first = frames[0]
    ds.Rows, ds.Columns = first.shape[:2]
    ds.SamplesPerPixel = first.shape[2] if first.ndim == 3 else 1
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * first.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)


def _encode(frame: np.ndarray, syntax: str, bits_stored: int) -> bytes:
    """One frame in ``syntax`` (a key of ICON_SYNTAXES) by a library the router does not use for it."""
    import imagecodecs
    from pydicom.pixels import get_encoder

    if syntax == "jpeg-lossless":
        return bytes(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=bits_stored))
    encoder = get_encoder(ICON_SYNTAXES[syntax])
    spp = frame.shape[2] if frame.ndim == 3 else 1
    return bytes(encoder.encode(
        frame, rows=frame.shape[0], columns=frame.shape[1], samples_per_pixel=spp,
        bits_allocated=8 * frame.dtype.itemsize, bits_stored=bits_stored, pixel_representation=0,
        photometric_interpretation="RGB" if spp == 3 else "MONOCHROME2", number_of_frames=1,
        planar_configuration=0,
    ))


def _set_pixel_data(ds: Dataset, frames: list[np.ndarray], syntax: str, bits_stored: int) -> None:
    from pydicom.encaps import encapsulate

    if syntax == "explicit-le":
        ds.PixelData = b"".join(np.ascontiguousarray(f, dtype=f.dtype.newbyteorder("<")).tobytes() for f in frames)
        ds["PixelData"].VR = "OW" if frames[0].dtype.itemsize > 1 else "OB"
        return
    ds.PixelData = encapsulate([_encode(f, syntax, bits_stored) for f in frames])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def icon_of(image: np.ndarray, size: int = 64) -> np.ndarray:
    """An 8-bit thumbnail of a 12-bit image, as modalities make them."""
    rows = np.linspace(0, image.shape[0] - 1, size).astype(int)
    columns = np.linspace(0, image.shape[1] - 1, size).astype(int)
    return (image[np.ix_(rows, columns)] >> 4).astype(np.uint8)


def mammogram_with_icon(tmp: Path, syntax: str, icon_syntax: str | None = None) -> Path:
    """A 12-bit mammogram (MONOCHROME2, 192 x 160, from the MR) with an Icon Image Sequence whose
    64 x 64 8-bit thumbnail is in ``icon_syntax`` (default: as the image, the usual case), the
    whole file in ``syntax``: one of ICON_SYNTAXES."""
    from pydicom.sequence import Sequence

    icon_syntax = icon_syntax or syntax
    main = pydicom.dcmread(MR).pixel_array[16:208, 40:200].astype(np.uint16)
    ds = _image_dataset(MAMMOGRAPHY, ICON_SYNTAXES[syntax])
    ds.Modality, ds.ImageType = "MG", ["ORIGINAL", "PRIMARY"]
    _set_image(ds, [main], 12)
    icon = Dataset()
    _set_image(icon, [icon_of(main)], 8)
    _set_pixel_data(icon, [icon_of(main)], icon_syntax, 8)
    ds.IconImageSequence = Sequence([icon])
    _set_pixel_data(ds, [main], syntax, 12)
    return write(ds, tmp / f"mammogram-{syntax}-icon-{icon_syntax}.dcm")


def icon_pixels(ds: Dataset) -> np.ndarray:
    """The icon of ``ds`` decoded by pydicom, in the file's transfer syntax."""
    from pydicom.pixels import get_decoder

    icon = ds.IconImageSequence[0]
    ts = ds.file_meta.TransferSyntaxUID
    if not icon["PixelData"].is_undefined_length:
        return np.frombuffer(icon.PixelData, f"<u{int(icon.BitsAllocated) // 8}").reshape(icon.Rows, icon.Columns)
    try:
        return get_decoder(ts).as_array(icon)[0]
    except NotImplementedError:  # JPEG XL, which pydicom 3.0 does not decode
        import imagecodecs
        from pydicom.encaps import generate_frames

        return imagecodecs.jpegxl_decode(next(generate_frames(icon.PixelData, number_of_frames=1)))


def curve_data_implicit(tmp: Path) -> Path:
    """An Implicit VR Little Endian image carrying the retired Curve Data (5000,3000) and other
    elements whose VR the dictionary leaves ambiguous, at the top level and in a sequence."""
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    ds = _image_dataset("1.2.840.10008.5.1.4.1.1.7", ImplicitVRLittleEndian)
    frame = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64)
    _set_image(ds, [frame], 12)
    ds.PixelRepresentation = 1
    ds.PixelData = frame.tobytes()
    # implicit VR carries no VR: whatever is written here, a reader gets the dictionary's
    ds.add_new(0x50000005, "US", 1)  # Curve Dimensions
    ds.add_new(0x50000010, "US", 8)  # Number of Points
    ds.add_new(0x50000103, "US", 0)  # Curve Data Value Representation: unsigned short
    ds.add_new(0x50003000, "OW", np.arange(8, dtype="<u2").tobytes())  # Curve Data: OB or OW
    ds.add_new(0x50023000, "OB", b"\x01\x02\x03\x04")  # Curve Data, word size unknown
    ds.add_new(0x00143050, "OB", b"\x05\x06\x07\x08")  # Dark Current Counts (DICONDE): OB or OW
    ds.add_new(0x00280071, "US", 65534)  # Perimeter Value (retired): US or SS
    ds.add_new(0x00281200, "OW", np.arange(4, dtype="<u2").tobytes())  # Gray LUT Data: US or SS or OW
    ds.add_new(0x00283006, "OW", np.arange(4, dtype="<u2").tobytes())  # LUT Data, no descriptor: US or OW
    item = Dataset()
    item.add_new(0x00280106, "US", 65534)  # Smallest Image Pixel Value: US or SS
    item.add_new(0x50043000, "OB", b"\x09\x0a\x0b\x0c")
    ds.ReferencedImageSequence = Sequence([item])
    ds.save_as(tmp / "curve-implicit.dcm", implicit_vr=True, little_endian=True, enforce_file_format=True)
    return tmp / "curve-implicit.dcm"


def tiled_jpeg(tmp: Path, tiles: list[tuple[int, int]], rows: int = 64, columns: int = 96) -> Path:
    """A multi-frame JPEG Baseline whole-slide image (RGB as YBR_FULL_422, Rows x Columns tiles),
    one frame per entry of ``tiles``: the (rows, columns) its codestream really has (edge tiles
    written smaller, or larger, than the header says)."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    ds = _image_dataset(VL_WHOLE_SLIDE, "1.2.840.10008.1.2.4.50")
    ds.Modality, ds.ImageType = "SM", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    rng = np.random.default_rng(7)
    codestreams = []
    for i, (height, width) in enumerate(tiles):
        y, x = np.mgrid[0:height, 0:width]
        tile = np.stack([(x * 2 + i * 40) % 256, (y * 3) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
        tile = np.clip(tile.astype(int) + rng.integers(0, 3, tile.shape), 0, 255).astype(np.uint8)
        codestreams.append(bytes(imagecodecs.jpeg8_encode(tile, level=95, subsampling="422")))
    _set_image(ds, [np.zeros((rows, columns, 3), np.uint8)], 8, "YBR_FULL_422")
    ds.NumberOfFrames = len(tiles)
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(codestreams)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write(ds, tmp / f"tiled-{len(tiles)}.dcm")


def jpeg_ls_frames(tmp: Path, frames: int, codestream: tuple[int, int], header: tuple[int, int] | None = None,
                   bits: int = 8) -> Path:
    """A multi-frame JPEG-LS Lossless file of constant frames, each codestream ``codestream``
    (rows, columns) large, the header declaring ``header`` (default: the same): a few KB that
    declare, or decode to, much more."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    dtype = np.uint8 if bits <= 8 else np.uint16
    data = bytes(imagecodecs.jpegls_encode(np.full(codestream, 7, dtype)))
    ds = _image_dataset("1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.1.2.4.80")
    _set_image(ds, [np.zeros(header or codestream, dtype)], bits)
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([data] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write(ds, tmp / f"jls-{frames}x{codestream[0]}x{codestream[1]}.dcm")
