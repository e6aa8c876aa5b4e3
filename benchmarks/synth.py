#!/usr/bin/env python3
"""Deterministic synthetic DICOM database generator (pydicom only, no numpy).

dicomvault's own copy of the generator used for the design-note baselines
(benchmarks only; generated data is never committed: write it under /tmp).

Clones real headers (pydicom's bundled CT_small.dcm and MR_small.dcm, or files
given with --template-ct/--template-mr), assigns fresh deterministic UIDs and
synthetic patients, and writes phantom pixel data with per-instance noise
directly as bytes (no pixel encoding through pydicom), so it is I/O bound.

Studies (mixed by --mix):
  petct  CT localizer (1 x 512x512) + CT axial (512x512 int16, --ct-slices)
         + PET (128x128 or 256x256 int16 with per-slice RescaleSlope,
         --pet-slices) sharing the study and frame of reference
  ct     CT localizer + CT axial
  mr     --mr-series series (T1/T2/FLAIR/DWI/...) of --mr-slices 256x256
         (one in five 512x512) uint16 slices

Examples:
  synth.py /tmp/db1g --size 1GB --seed 1
  synth.py /tmp/small --patients 20 --studies 1-2 --ct-slices 20-40 \
      --pet-slices 20-40 --mr-slices 5-10 --seed 7 --layout tree
Sizes: K/M/G/T suffixes (optionally with B) are decimal, KiB/MiB/GiB binary.
Same arguments + same seed => byte-identical output, whatever --jobs is.
Output: OUT/DICOM/P0000001/ST000001/SE000001/I0000001 ("fileset": valid DICOM
File IDs, ready for dcmmkdir), or OUT/<PatientID>/<StudyUID>/<SeriesUID>/
<SOPUID>.dcm ("tree"), or OUT/<SOPUID>.dcm ("flat"); plus OUT/synth.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import random
import re
import struct
import sys
import time
from multiprocessing import Pool

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PET_CLASS = "1.2.840.10008.5.1.4.1.1.128"
MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"
HEADER_EST = {"CT": 7000, "PT": 2600, "MR": 1900}  # planning estimate, bytes

NAMES_ASCII = [("SMITH", "JOHN"), ("JONES", "MARY"), ("NGUYEN", "LINH"), ("GARCIA", "ANA"),
               ("MILLER", "PAUL"), ("DAVIS", "EMMA"), ("KOWALSKI", "PIOTR"), ("ROSSI", "GIULIA"),
               ("SCHMIDT", "ANNA"), ("DUBOIS", "LUC"), ("OKAFOR", "CHIDI"), ("TANAKA", "YUKI"),
               ("SILVA", "JOAO"), ("HANSEN", "ERIK"), ("MURPHY", "SEAN"), ("BERG", "INGRID")]
NAMES_LATIN1 = [("MÜLLER", "JÜRGEN"), ("ØDEGÅRD", "ÅSE"), ("GONZÁLEZ", "JOSÉ"), ("LEFÈVRE", "HÉLÈNE"),
                ("NÚÑEZ", "IÑIGO"), ("BJÖRK", "SÖREN")]
# Greek and Cyrillic on purpose (character-set coverage): not look-alikes of Latin letters
NAMES_UTF8 = [("ИВАНОВ", "ПЁТР"), ("山田", "太郎"), ("ΖΑΧΑΡΙΟΥ", "ΕΛΕΝΗ"), ("ŁUKASIEWICZ", "ŻANETA"),  # noqa: RUF001
              ("김", "민준"), ("ČAPEK", "KAREL")]
MR_SEQS = [("T1_SE_AX", 500, 12), ("T2_TSE_AX", 4000, 95), ("FLAIR_AX", 9000, 110),
           ("DWI_B1000", 5200, 80), ("T1_MPRAGE", 2300, 3), ("T2_COR", 3800, 90),
           ("SWI", 28, 20), ("PD_SAG", 2500, 30)]


# ----------------------------------------------------------------------------- helpers
def parse_size(s: str | None) -> int | None:
    if s is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B?)\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    num, unit, suf = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if suf.startswith("I") else 1000
    return int(num * base ** " KMGT".index(unit or " "))


def parse_range(s: str) -> tuple[int, int]:
    a, _, b = s.partition("-")
    return int(a), int(b or a)


def parse_mix(s: str) -> list[tuple[str, float]]:
    out = []
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k not in ("petct", "ct", "mr"):
            raise argparse.ArgumentTypeError(f"unknown study kind {k!r}")
        out.append((k, float(v or 1)))
    return out


def uid(seed: int, *parts) -> str:
    """Deterministic 2.25 UID (<= 64 chars) from seed and identity parts."""
    h = hashlib.sha256((f"synth:{seed}:" + ":".join(map(str, parts))).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def inst_rng(seed: int, *parts) -> random.Random:
    h = hashlib.sha256((f"px:{seed}:" + ":".join(map(str, parts))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def fmt_ds(x: float) -> str:
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


# ----------------------------------------------------------------------------- planning
def plan(args) -> list[dict]:
    """Return the list of series to write (deterministic)."""
    r = random.Random(args.seed)
    kinds, weights = zip(*args.mix, strict=True)
    series_out: list[dict] = []
    total = 0
    target = args.size
    pi = 0
    while True:
        if args.patients is not None and pi >= args.patients:
            break
        if target is not None and total >= target:
            break
        pi += 1
        # patient
        u = r.random()
        if u < 0.08:
            (fam, giv), cs = r.choice(NAMES_UTF8), "ISO_IR 192"
        elif u < 0.2:
            (fam, giv), cs = r.choice(NAMES_LATIN1), "ISO_IR 100"
        else:
            (fam, giv), cs = r.choice(NAMES_ASCII), "ISO_IR 100"
        sex = r.choice("MF")
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=r.randrange(0, 365 * 65))
        patient = dict(pi=pi, PatientID=f"SYN{args.seed % 1000:03d}{pi:06d}",
                       PatientName=f"{fam}^{giv}", charset=cs, sex=sex,
                       birth=birth.strftime("%Y%m%d"), weight=fmt_ds(r.uniform(48, 110)),
                       size=fmt_ds(r.uniform(1.5, 1.95)))
        nstudies = r.randint(*args.studies)
        for si in range(1, nstudies + 1):
            kind = r.choices(kinds, weights)[0]
            sdate = dt.date(2015, 1, 1) + dt.timedelta(days=r.randrange(0, 3650))
            stime = dt.time(r.randrange(7, 19), r.randrange(60), r.randrange(60))
            age = max(0, (sdate - birth).days // 365)
            study = dict(si=si, kind=kind, date=sdate.strftime("%Y%m%d"), time=stime.strftime("%H%M%S"),
                         uid=uid(args.seed, "study", pi, si), for_uid=uid(args.seed, "for", pi, si),
                         accession=f"A{args.seed % 100:02d}{pi:06d}{si:02d}", age=f"{age:03d}Y",
                         study_id=str(r.randrange(1000, 99999)))
            sers = []
            if kind in ("petct", "ct"):
                n = r.randint(*args.ct_slices)
                thick = r.choice([1.25, 2.5, 3.0, 5.0])
                sers.append(dict(mod="CT", sub="LOCALIZER", rows=512, cols=512, n=1,
                                 desc="Topogram 0.6 T20f"))
                sers.append(dict(mod="CT", sub="AXIAL", rows=512, cols=512, n=n, thick=thick,
                                 desc=r.choice(["WB CT 3.0 B31f", "CT ABD-PELVIS", "CT THORAX 1.25",
                                                "CT Low Dose AC"])))
                if kind == "petct":
                    m = r.choice([128, 256]) if args.pet_matrix == "mixed" else int(args.pet_matrix)
                    sers.append(dict(mod="PT", sub="WB", rows=m, cols=m, n=r.randint(*args.pet_slices),
                                     thick=r.choice([2.0, 3.0, 4.0]),
                                     desc=r.choice(["PET WB AC", "PET WB OSEM 3i21s", "PET AC 2mm"])))
            else:
                nser = r.randint(*args.mr_series)
                for k in range(nser):
                    seq = MR_SEQS[(k + r.randrange(len(MR_SEQS))) % len(MR_SEQS)]
                    m = 512 if r.random() < 0.2 else 256
                    sers.append(dict(mod="MR", sub=seq[0], tr=seq[1], te=seq[2], rows=m, cols=m,
                                     n=r.randint(*args.mr_slices), thick=r.choice([3.0, 4.0, 5.0]),
                                     desc=seq[0]))
            for ri, s in enumerate(sers, start=1):
                s.update(ri=ri, uid=uid(args.seed, "series", pi, si, ri), patient=patient, study=study)
                px = s["rows"] * s["cols"] * 2
                per = px + HEADER_EST[s["mod"]] + 150
                if target is not None and total + s["n"] * per > target:
                    s["n"] = max(1, (target - total + per - 1) // per)
                total += s["n"] * per
                series_out.append(s)
                if target is not None and total >= target:
                    return series_out
    return series_out


# ----------------------------------------------------------------------------- templates
_TPL: dict = {}
_BASE: dict = {}


def load_templates(ct_path, mr_path):
    from pydicom.data import get_testdata_file
    ct = pydicom.dcmread(ct_path or get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(mr_path or get_testdata_file("MR_small.dcm"))
    for ds in (ct, mr):
        for t in (0x7FE00010, 0xFFFCFFFC):
            if t in ds:
                del ds[t]
    pt = copy.deepcopy(ct)
    pt.remove_private_tags()
    for kw in ("KVP", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "FocalSpots",
               "ConvolutionKernel", "ScanOptions", "DataCollectionDiameter", "DistanceSourceToDetector",
               "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight", "ContrastBolusAgent",
               "ContrastBolusRoute", "SpacingBetweenSlices", "ReconstructionDiameter", "PixelPaddingValue",
               "ImageComments", "OtherPatientIDsSequence", "PatientPosition"):
        if kw in pt:
            delattr(pt, kw)
    pt.SOPClassUID = PET_CLASS
    pt.Modality = "PT"
    pt.Manufacturer = "SYNTH PET"
    pt.ManufacturerModelName = "Synthetic PET/CT"
    pt.ImageType = ["ORIGINAL", "PRIMARY"]
    pt.SeriesType = ["WHOLE BODY", "IMAGE"]
    pt.Units = "BQML"
    pt.CountsSource = "EMISSION"
    pt.CorrectedImage = ["ATTN", "DECY", "SCAT", "NORM", "RAN"]
    pt.DecayCorrection = "START"
    pt.RandomsCorrectionMethod = "DLYD"
    pt.ReconstructionMethod = "OSEM 3i21s"
    pt.AttenuationCorrectionMethod = "CT-derived mu-map"
    pt.DecayFactor = "1.0523"
    pt.DoseCalibrationFactor = "1"
    pt.ScatterFractionFactor = "0.3"
    pt.ActualFrameDuration = 180000
    pt.CollimatorType = "NONE"
    pt.PatientGantryRelationshipCodeSequence = Sequence()
    pt.PatientOrientationCodeSequence = Sequence()
    rp = Dataset()
    rp.Radiopharmaceutical = "Fluorodeoxyglucose"
    rp.RadiopharmaceuticalStartTime = "080000"
    rp.RadionuclideTotalDose = "370000000"
    rp.RadionuclideHalfLife = "6586.2"
    rp.RadionuclidePositronFraction = "0.967"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
    rp.RadionuclideCodeSequence = Sequence([code])
    pt.RadiopharmaceuticalInformationSequence = Sequence([rp])
    pt.BitsStored, pt.HighBit, pt.PixelRepresentation = 16, 15, 1
    pt.RescaleIntercept = "0"
    pt.RescaleType = "BQML"
    for ds in (ct, pt, mr):
        ds.ensure_file_meta()
    _TPL.update(CT=ct, PT=pt, MR=mr)


def base_image(mod: str, sub: str, rows: int, cols: int, k: int) -> tuple[int, int, int]:
    """(base_int, mask_int, nbytes) phantom for anatomy level k (0..15)."""
    key = (mod, sub, rows, cols, k)
    if key in _BASE:
        return _BASE[key]
    n = rows * cols
    img = bytearray(2 * n)
    msk = bytearray(2 * n)
    cy, cx = rows / 2.0, cols / 2.0
    f = 0.75 + 0.25 * abs(((k % 16) - 7.5) / 7.5)  # body size varies along z
    p = lambda v: struct.pack("<h", v)  # noqa: E731
    if mod == "CT":
        shapes = [("circle", 0, 0, 0.5, 0.5, p(24), p(0x000F))]  # FOV: air -1000 HU
        shapes.append(("ellipse", 0, 0.05, 0.40 * f, 0.28 * f, p(1064), p(0x003F)))  # soft tissue
        if sub == "AXIAL" and 3 <= k <= 10:
            for sx in (-0.17, 0.17):  # lungs
                shapes.append(("ellipse", sx, -0.02, 0.12 * f, 0.16 * f, p(174), p(0x001F)))
        shapes.append(("ellipse", 0, 0.22 * f, 0.05, 0.05, p(1724), p(0x007F)))  # spine
        shapes.append(("rect", 0, 0.40, 0.45, 0.015, p(1224), p(0x0007)))  # table
        bg, bgm = p(-2000), p(0)
    elif mod == "PT":
        shapes = [("ellipse", 0, 0.05, 0.40 * f, 0.28 * f, p(600), p(0x03FF))]
        shapes.append(("ellipse", 0.1 * (k % 3 - 1), -0.05, 0.04, 0.04, p(9000), p(0x0FFF)))  # lesion
        if k in (0, 1, 2):
            shapes.append(("ellipse", 0, 0, 0.15, 0.15, p(7000), p(0x07FF)))  # brain
        if k in (12, 13):
            shapes.append(("ellipse", 0, 0.05, 0.06, 0.05, p(12000), p(0x0FFF)))  # bladder
        bg, bgm = p(0), p(0x000F)
    else:  # MR
        shapes = [("ellipse", 0, 0, 0.38 * f, 0.44 * f, p(900), p(0x007F))]
        shapes.append(("ellipse", 0, 0, 0.33 * f, 0.39 * f, p(1400), p(0x003F)))
        shapes.append(("ellipse", 0.08, 0, 0.06, 0.12, p(2600), p(0x007F)))
        shapes.append(("ellipse", -0.08, 0, 0.06, 0.12, p(2600), p(0x007F)))
        bg, bgm = p(0), p(0x000F)
    img[:] = bg * n
    msk[:] = bgm * n
    for y in range(rows):
        yy = (y + 0.5 - cy) / rows
        o = 2 * y * cols
        for kind, sx, sy, ax, ay, val, m in shapes:
            if kind == "rect":
                if abs(yy - sy) > ay:
                    continue
                half = ax
            else:
                d = 1 - ((yy - sy) / ay) ** 2
                if d <= 0:
                    continue
                half = ax * d ** 0.5
            x0 = max(0, round((sx - half) * cols + cx))
            x1 = min(cols, round((sx + half) * cols + cx))
            if x1 > x0:
                img[o + 2 * x0:o + 2 * x1] = val * (x1 - x0)
                msk[o + 2 * x0:o + 2 * x1] = m * (x1 - x0)
    out = (int.from_bytes(img, "little"), int.from_bytes(msk, "little"), 2 * n)
    _BASE[key] = out
    return out


# ----------------------------------------------------------------------------- writing
def series_dataset(s: dict, seed: int) -> Dataset:
    pat, st = s["patient"], s["study"]
    ds = copy.deepcopy(_TPL[s["mod"]])
    ds.SpecificCharacterSet = pat["charset"]
    ds.PatientName = pat["PatientName"]
    ds.PatientID = pat["PatientID"]
    ds.PatientBirthDate = pat["birth"]
    ds.PatientSex = pat["sex"]
    ds.PatientAge = st["age"]
    ds.PatientWeight = pat["weight"]
    ds.PatientSize = pat["size"]
    ds.StudyInstanceUID = st["uid"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = st["date"]
    ds.InstanceCreationDate = st["date"]
    ds.StudyTime = st["time"]
    ds.StudyID = st["study_id"]
    ds.AccessionNumber = st["accession"]
    ds.StudyDescription = {"petct": "PET/CT WHOLE BODY FDG", "ct": "CT CHEST ABDOMEN PELVIS",
                           "mr": "MR BRAIN W/WO"}[st["kind"]]
    ds.ReferringPhysicianName = "REFERRER^SYNTH"
    ds.InstitutionName = "SYNTHETIC HOSPITAL"
    ds.SeriesInstanceUID = s["uid"]
    ds.SeriesNumber = s["ri"]
    ds.SeriesDescription = s["desc"]
    ds.FrameOfReferenceUID = st["for_uid"]
    ds.Rows, ds.Columns = s["rows"], s["cols"]
    ds.BitsAllocated = 16
    if s["mod"] == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", s["sub"]]
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.PixelPaddingValue = -2000
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        sp = 500.0 / s["cols"]
    elif s["mod"] == "PT":
        sp = 700.0 / s["cols"]
        ds.NumberOfSlices = s["n"]
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = st["time"]
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.SequenceName = s["sub"]
        ds.RepetitionTime, ds.EchoTime = str(s["tr"]), str(s["te"])
        ds.WindowCenter, ds.WindowWidth = "1200", "2400"
        sp = 230.0 / s["cols"]
    ds.PixelSpacing = [fmt_ds(sp), fmt_ds(sp)]
    if s["sub"] == "LOCALIZER":
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.SliceThickness = "0.6"
    else:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = fmt_ds(s["thick"])
    return ds


DYN_TAGS = {0x00080013, 0x00080018, 0x00080032, 0x00080033, 0x00200013, 0x00200032,
            0x00201041, 0x00281053, 0x00541300, 0x00541330}


def _enc(elem, implicit: bool, encodings) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _meta(sop_class: str, sop: str, ts: str) -> bytes:
    """Part-10 preamble + explicit-VR-LE file meta group, built by hand."""
    def el(tag_e, vr, val: bytes) -> bytes:
        if len(val) % 2:
            val += b"\0" if vr == b"UI" else b" "
        if vr == b"OB":
            return struct.pack("<HH", 2, tag_e) + vr + b"\0\0" + struct.pack("<I", len(val)) + val
        return struct.pack("<HH", 2, tag_e) + vr + struct.pack("<H", len(val)) + val
    body = (el(0x0001, b"OB", b"\0\1") + el(0x0002, b"UI", sop_class.encode()) +
            el(0x0003, b"UI", sop.encode()) + el(0x0010, b"UI", ts.encode()) +
            el(0x0012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode()) + el(0x0013, b"SH", b"SYNTH_PY"))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body)) + body


def write_chunk(task) -> tuple[int, int]:
    s, first, last, args = task
    if not _TPL:
        load_templates(args["template_ct"], args["template_mr"])
    seed = args["seed"]
    ds = series_dataset(s, seed)
    ds.file_meta = FileMetaDataset()
    pat, st = s["patient"], s["study"]
    implicit = args["ts"] == "implicit"
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    layout, out = args["layout"], args["out"]
    if layout == "fileset":
        d = os.path.join(out, "DICOM", f"P{pat['pi']:07d}", f"ST{st['si']:06d}", f"SE{s['ri']:06d}")
    elif layout == "tree":
        d = os.path.join(out, pat["PatientID"], st["uid"], s["uid"])
    else:
        d = out
    os.makedirs(d, exist_ok=True)
    n = s["n"]
    nbytes = 0
    t0 = dt.datetime.strptime(st["date"] + st["time"], "%Y%m%d%H%M%S") + dt.timedelta(minutes=3 * s["ri"])
    ds.SeriesTime = t0.strftime("%H%M%S")
    thick = float(s.get("thick", 1.0))
    # make sure every dynamic element exists, then split the header into static runs + slots
    ds.SOPInstanceUID = "1"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.SliceLocation = "0"
    ds.AcquisitionTime = ds.ContentTime = ds.InstanceCreationTime = "000000"
    if s["mod"] == "PT":
        ds.ImageIndex = 1
        ds.FrameReferenceTime = "0"
        ds.RescaleSlope = "1"
    enc = ds._character_set
    parts: list = []
    run = []
    for elem in ds:
        if elem.tag in DYN_TAGS:
            parts.append(b"".join(run))
            run = []
            parts.append(elem.tag)
        else:
            run.append(_enc(elem, implicit, enc))
    parts.append(b"".join(run))
    pelem = (b"\xe0\x7f\x10\x00" + (b"" if implicit else b"OW\x00\x00"))
    px0 = fmt_ds(-float(ds.PixelSpacing[0]) * s["cols"] / 2)
    py0 = fmt_ds(-float(ds.PixelSpacing[1]) * s["rows"] / 2)
    for i in range(first, last):
        sop = uid(seed, "sop", pat["pi"], st["si"], s["ri"], i)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        z = -thick * i
        ds.ImagePositionPatient = [px0, py0, fmt_ds(z)]
        ds.SliceLocation = fmt_ds(z)
        tt = (t0 + dt.timedelta(seconds=i // 4)).strftime("%H%M%S")
        ds.AcquisitionTime = ds.ContentTime = ds.InstanceCreationTime = tt
        rng = inst_rng(seed, pat["pi"], st["si"], s["ri"], i)
        if s["mod"] == "PT":
            ds.ImageIndex = i + 1
            ds.FrameReferenceTime = fmt_ds(90000.0 + 180000 * (i // 50))
            ds.RescaleSlope = fmt_ds(rng.uniform(0.5, 4.0))
        k = (i * 16) // max(1, n) if s["sub"] != "LOCALIZER" else 6
        base, mask, npx = base_image(s["mod"], s["sub"], s["rows"], s["cols"], k)
        noise = int.from_bytes(rng.randbytes(npx), "little") & mask
        pix = (base + noise).to_bytes(npx, "little")
        head = _meta(ds.SOPClassUID, sop, ts) + b"".join(
            p if isinstance(p, bytes) else _enc(ds[p], implicit, enc) for p in parts)
        if layout == "fileset":
            fn = os.path.join(d, f"I{i + 1:07d}")
        else:
            fn = os.path.join(d, sop + ".dcm")
        with open(fn, "wb") as fh:
            fh.write(head)
            fh.write(pelem + struct.pack("<I", npx))
            fh.write(pix)
        nbytes += len(head) + len(pelem) + 4 + npx
    return last - first, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", type=parse_size, help="stop once this many bytes are planned (e.g. 1GB, 5GB)")
    ap.add_argument("--patients", type=int, help="number of patients (default: unlimited with --size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--studies", type=parse_range, default=(1, 3), help="studies per patient, e.g. 1-3")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix("petct=2,ct=1,mr=1"))
    ap.add_argument("--ct-slices", type=parse_range, default=(80, 300))
    ap.add_argument("--pet-slices", type=parse_range, default=(100, 250))
    ap.add_argument("--pet-matrix", choices=["128", "256", "mixed"], default="mixed")
    ap.add_argument("--mr-series", type=parse_range, default=(3, 6))
    ap.add_argument("--mr-slices", type=parse_range, default=(20, 60))
    ap.add_argument("--layout", choices=["fileset", "tree", "flat"], default="fileset")
    ap.add_argument("--ts", choices=["explicit", "implicit"], default="explicit")
    ap.add_argument("--template-ct", help="real CT file to clone (default: pydicom CT_small.dcm)")
    ap.add_argument("--template-mr", help="real MR file to clone (default: pydicom MR_small.dcm)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=32, help="instances per work item")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only")
    a = ap.parse_args(argv)
    if a.size is None and a.patients is None:
        ap.error("give --size and/or --patients")
    series = plan(a)
    n_inst = sum(s["n"] for s in series)
    pats = {s["patient"]["pi"] for s in series}
    studies = {(s["patient"]["pi"], s["study"]["si"]) for s in series}
    est = sum(s["n"] * (s["rows"] * s["cols"] * 2 + HEADER_EST[s["mod"]] + 150) for s in series)
    print(f"plan: {len(pats)} patients, {len(studies)} studies, {len(series)} series, "
          f"{n_inst} instances, ~{est/1e6:.0f} MB", file=sys.stderr)
    if a.dry_run:
        return 0
    os.makedirs(a.out, exist_ok=True)
    common = dict(seed=a.seed, out=a.out, layout=a.layout, ts=a.ts,
                  template_ct=a.template_ct, template_mr=a.template_mr)
    tasks = []
    for s in series:
        for f in range(0, s["n"], a.chunk):
            tasks.append((s, f, min(s["n"], f + a.chunk), common))
    t = time.time()
    files = total = 0
    if a.jobs <= 1:
        results = map(write_chunk, tasks)
        for nf, nb in results:
            files += nf
            total += nb
    else:
        with Pool(a.jobs) as pool:
            for nf, nb in pool.imap_unordered(write_chunk, tasks, chunksize=1):
                files += nf
                total += nb
    el = time.time() - t
    info = dict(args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
                patients=len(pats), studies=len(studies), series=len(series), instances=files,
                bytes=total, seconds=round(el, 2), pydicom=pydicom.__version__)
    with open(os.path.join(a.out, "synth.json"), "w") as fh:
        json.dump(info, fh, indent=1, default=str)
    print(f"wrote {files} files, {total/1e6:.1f} MB in {el:.1f} s "
          f"({total/1e6/max(el, 1e-9):.0f} MB/s, {files/max(el, 1e-9):.0f} files/s) -> {a.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
