"""A 12-bit mammography-like study built from real data, for the slow-link test and benchmark.

pydicom-data has no mammogram. The images here are cut from a mirror-tiled copy of a real
computed radiograph (pydicom-data `RG1_UNCR.dcm`, a 1955 x 1841 chest CR, 15 bits stored),
requantised to 12 bits (the top 12 of its 15): every pixel and its noise come from the real
detector, nothing is synthesised or interpolated. Four views (LCC, RCC, LMLO, RMLO), each cut
at another offset of the tiling and the right ones mirrored, as Digital Mammography X-Ray Image
Storage - For Presentation, Explicit VR Little Endian, in one study of two series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.peers import data

SOURCE = "RG1_UNCR.dcm"
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
VIEWS = (("L", "CC", 1), ("R", "CC", 1), ("L", "MLO", 2), ("R", "MLO", 2))  # laterality, view, series


def twelve_bit_source() -> np.ndarray:
    """The real radiograph, requantised from 15 to 12 bits stored."""
    return (dcmread(data(SOURCE)).pixel_array >> 3).astype(np.uint16)


def view(rows: int, columns: int, index: int) -> np.ndarray:
    """One view: a rows x columns cut of the mirror-tiled source, at an offset per view."""
    source = twelve_bit_source()
    offset_r, offset_c = (index * 613) % source.shape[0], (index * 397) % source.shape[1]
    tiled = np.pad(source, ((0, rows + offset_r), (0, columns + offset_c)), mode="symmetric")
    cut = tiled[offset_r:offset_r + rows, offset_c:offset_c + columns]
    return np.ascontiguousarray(cut[:, ::-1] if VIEWS[index][0] == "R" else cut)


def mammography_study(directory: Path, rows: int = 4090, columns: int = 3300) -> list[Path]:
    """Write the four views as one new study in `directory`; returns their paths in
    series and instance number order."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(data(SOURCE))
    study, series_uids = generate_uid(), {1: generate_uid(), 2: generate_uid()}
    ds.StudyInstanceUID = study
    ds.Modality = "MG"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MAMMOGRAPHY
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.StudyDescription = "MAMMOGRAPHY SCREENING"
    ds.BodyPartExamined = "BREAST"
    paths = []
    for index, (laterality, position, series) in enumerate(VIEWS):
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uids[series], series
        ds.InstanceNumber = 1 if laterality == "L" else 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageLaterality, ds.ViewPosition = laterality, position
        ds.PixelData = view(rows, columns, index).tobytes()
        path = directory / f"{laterality}{position}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths, key=lambda p: (dcmread(p, stop_before_pixels=True).SeriesNumber,
                                        dcmread(p, stop_before_pixels=True).InstanceNumber))
