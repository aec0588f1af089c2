"""Synthetic multi-centre SWI cohort with cerebral microbleeds (CMBs).

The embedded default cohort of cmb-csvd: it works offline and exercises every part
of the pipeline (small lesions, realistic mimics, disease-specific lesion locations,
centre differences). Only numpy, scipy and nibabel are used; Detectron2 is never
imported here.

Anatomy
    The ICBM152 2009a symmetric T1 / GM / WM maps that ship inside the ``nilearn``
    wheel (``nilearn/datasets/data``; read with nibabel, no fetcher, no download).
    CSF = brain mask - GM - WM. A head (meninges, skull with diploe, scalp) is added
    outside the brain from the distance to the brain mask. Iron-rich nuclei (globus
    pallidus, substantia nigra, red nucleus, dentate; milder putamen, caudate,
    pulvinar, increasing with age) are soft ellipsoids at MNI coordinates.

Per patient
    A smooth random deformation (separable cosine basis, ~2-3 mm RMS), anisotropic
    scaling (0.92-1.08), a head rotation and translation, all composed with the
    centre's grid (spacing, matrix, slice tilt) into one coordinate map that is
    sampled once (``scipy.ndimage.map_coordinates``, order 1). The template intensity
    is blurred along z by the centre's slice profile first. Then: SWI contrast (CSF
    bright, GM darker than WM, dark iron nuclei), lesions and mimics rendered
    analytically on the centre grid, a smooth multiplicative bias field, a global
    gain and Rician noise at the centre's SNR.

Region rule (template space, MNI mm; ``|x|`` = distance from the midline)
    1. brain = template T1 > 0 (includes ventricles and sulcal CSF).
    2. brainstem: ``z < -3`` and inside a per-height cross-section table
       (``_BRAINSTEM_TABLE``: half-width in x, y-range, linearly interpolated in z).
    3. cerebellum: not brainstem, ``y < -30`` and below the tentorium
       ``z < -6 - 0.4 |x| - 0.015 (y + 60)^2``.
    4. Everything else is supratentorial. Deep grey: thalamus = ellipsoid
       c (+-11.5, -18.5, 7.5) semi-axes (9.5, 15.5, 9.5), CSF < 0.5; basal ganglia =
       caudate ellipsoid c (+-13, 10, 12) s (6, 13, 11) or lentiform ellipsoid
       c (+-22, 1, 1) s (10, 16, 10), GM >= WM, CSF < 0.5, not thalamus.
       Internal capsule = ellipsoid c (+-21, -8, 8) s (13, 28, 14), WM > GM, not deep
       grey. External capsule = ``27 <= |x| <= 34``, -20 < y < 22, -12 < z < 18,
       WM > GM. Corpus callosum = ``|x| <= 12``, -42 < y < 36, 0 < z < 34, WM > GM.
       Deep / periventricular WM = other supratentorial voxels with WM >= GM that lie
       >= 15 mm inside the brain surface and > 2 mm from cortical GM (GM > 0.5 that is
       not deep grey), outside the insular box.
    5. Lobar = every other supratentorial voxel (cortex, juxtacortical WM, sulcal
       CSF), split in order: insula (``29 <= |x| <= 46``, -20 < y < 30, -15 < z < 20,
       >= 8 mm inside the surface), temporal (``|x| > 20`` and ``z < -4 - 0.4 y``),
       occipital (``y < -64 - 0.3 z``), frontal (``y > 6 - 0.6 z``), parietal (rest).
    The planes and ellipsoids were calibrated once against the MARS atlas (Sundaresan
    et al. 2023); ``mars_agreement`` measures the agreement (about 0.90 of brain
    tissue voxels share the lobar / deep / infratentorial group).

Lesions and mimics
    CMBs are ellipsoids (equivalent-sphere diameter from ``LESION_SIZE``) with
    partial volume by supersampling at the centre's resolution, a near-void core and
    a softer, wider blooming halo (scaled by the centre's ``blooming``). The mask is
    the set of voxels at least 50 % covered by the true (non-bloomed) extent; a
    lesion too small for any voxel to reach 50 % keeps its most-covered voxel. Each
    lesion has an instance id 1..N. Mimics (veins in every patient: cortical veins
    traced along sulci, medullary veins radiating from the lateral ventricles, the
    deep veins and dural sinuses; bilateral pallidal calcification; susceptibility
    artefacts at the frontal sinus and the temporal bones; cortical superficial
    siderosis) are never in the CMB mask: lesion centres are rejected near them. Their
    own mask (``mimic_mask.nii.gz``, codes in ``MIMIC_CODES``) is written too.

All distribution parameters live in ``CLASS_DISTRIBUTIONS``, ``LESION_SIZE`` and
``MIMICS`` below (one table, documented in place).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ..fileio import atomic_output, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "REGIONS",
    "SUBREGIONS",
    "MIMIC_CODES",
    "ClassDistribution",
    "CLASS_DISTRIBUTIONS",
    "LESION_SIZE",
    "MIMICS",
    "CenterProfile",
    "CenterProfileError",
    "BUILTIN_CENTERS",
    "load_center_profile",
    "save_center_profile",
    "resolve_centers",
    "PatientSpec",
    "Lesion",
    "PatientPlan",
    "RenderedPatient",
    "Template",
    "get_template",
    "template_dir",
    "cohort_specs",
    "plan_patient",
    "render_patient",
    "generate_patient",
    "generate_cohort",
    "write_preview",
    "mars_agreement",
]

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------
CLASSES: tuple[str, ...] = ("aSVD", "CAA", "CADASIL")

#: subregion -> MARS group. Codes in the template region map are 1-based indices here.
SUBREGIONS: dict[str, str] = {
    "brainstem": "infratentorial",
    "cerebellum": "infratentorial",
    "basal_ganglia": "deep",
    "thalamus": "deep",
    "internal_capsule": "deep",
    "external_capsule": "deep",
    "corpus_callosum": "deep",
    "deep_wm": "deep",
    "frontal": "lobar",
    "parietal": "lobar",
    "temporal": "lobar",
    "occipital": "lobar",
    "insula": "lobar",
}
_SUB_NAMES: tuple[str, ...] = tuple(SUBREGIONS)
_SUB_CODE: dict[str, int] = {n: i + 1 for i, n in enumerate(_SUB_NAMES)}  # same order as MARS
REGIONS: tuple[str, ...] = ("lobar", "deep", "infratentorial")

#: values of mimic_mask.nii.gz
MIMIC_CODES: dict[str, int] = {"vein": 1, "calcification": 2, "artefact": 3, "siderosis": 4}


# --------------------------------------------------------------------------------------
# The distribution table (every parameter of the cohort's disease model)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassDistribution:
    """Per-class generative parameters.

    Ages: normal(``age_mean``, ``age_sd``) clipped to [``age_min``, ``age_max``].
    CMB count: 0 with ``p_zero``, 1 with ``p_one``, else ``2 + NegBin`` with mean
    ``count_mean`` and dispersion ``count_dispersion`` (smaller = heavier tail),
    capped at ``count_max``. ``patterns`` chooses the patient's distribution pattern
    (probabilities); ``subregion_weights[pattern]`` gives the per-lesion subregion
    probabilities. In a ``mixed`` pattern with >= 2 CMBs at least one is lobar and
    one is deep or infratentorial. ``p_siderosis[pattern]``: cortical superficial
    siderosis share.
    """

    age_mean: float
    age_sd: float
    age_min: float
    age_max: float
    p_zero: float
    p_one: float
    count_mean: float
    count_dispersion: float
    count_max: int
    patterns: Mapping[str, float]
    subregion_weights: Mapping[str, Mapping[str, float]]
    p_siderosis: Mapping[str, float]


_LOBAR_POSTERIOR = {"occipital": 0.32, "parietal": 0.26, "temporal": 0.22, "frontal": 0.16,
                    "insula": 0.04}
_DEEP_HTN = {"basal_ganglia": 0.30, "thalamus": 0.22, "internal_capsule": 0.05,
             "external_capsule": 0.05, "corpus_callosum": 0.02, "deep_wm": 0.08,
             "brainstem": 0.18, "cerebellum": 0.10}
_MIXED_HTN = {**{k: 0.65 * v for k, v in _DEEP_HTN.items()},
              "frontal": 0.10, "parietal": 0.08, "temporal": 0.08, "occipital": 0.07,
              "insula": 0.02}
_CADASIL = {"thalamus": 0.26, "brainstem": 0.16, "temporal": 0.16, "deep_wm": 0.12,
            "basal_ganglia": 0.10, "cerebellum": 0.05, "frontal": 0.05, "parietal": 0.04,
            "occipital": 0.03, "internal_capsule": 0.03}

#: Sources: ../shared/REFERENCES.md (Boston v2.0, Blanc 2019, Nannucci 2018, Poels 2010).
CLASS_DISTRIBUTIONS: dict[str, ClassDistribution] = {
    # CAA: strictly lobar, posterior predominance, heavy tail, siderosis common, older.
    "CAA": ClassDistribution(
        age_mean=74.0, age_sd=7.0, age_min=55.0, age_max=92.0,
        p_zero=0.10, p_one=0.15, count_mean=12.0, count_dispersion=0.6, count_max=150,
        patterns={"lobar": 1.0},
        subregion_weights={"lobar": _LOBAR_POSTERIOR},
        p_siderosis={"lobar": 0.45},
    ),
    # aSVD (hypertensive arteriopathy): deep + infratentorial, mixed share with lobar.
    "aSVD": ClassDistribution(
        age_mean=66.0, age_sd=9.0, age_min=45.0, age_max=88.0,
        p_zero=0.10, p_one=0.15, count_mean=6.0, count_dispersion=0.8, count_max=80,
        patterns={"deep": 0.45, "mixed": 0.55},
        subregion_weights={"deep": _DEEP_HTN, "mixed": _MIXED_HTN},
        p_siderosis={"deep": 0.10, "mixed": 0.24},
    ),
    # CADASIL: thalamus, brainstem, temporal / subcortical; younger; many without CMB.
    "CADASIL": ClassDistribution(
        age_mean=52.0, age_sd=6.0, age_min=40.0, age_max=65.0,
        p_zero=0.35, p_one=0.15, count_mean=6.0, count_dispersion=0.4, count_max=120,
        patterns={"cadasil": 1.0},
        subregion_weights={"cadasil": _CADASIL},
        p_siderosis={"cadasil": 0.03},
    ),
}

#: CMB equivalent-sphere diameter: lognormal(median, sigma) truncated to [min, max] mm
#: (about 85 % in 2-5 mm). Ovoid elongation (long / short axis) uniform in [1, max].
LESION_SIZE: dict[str, float] = {
    "median_mm": 3.4, "sigma": 0.33, "min_mm": 2.0, "max_mm": 10.0, "elongation_max": 1.4,
    "core_depth": 0.88,  # signal loss inside the true extent
    "halo_depth": 0.70,  # blooming halo peak signal loss
    "halo_sigma_mm": 0.9,  # halo width at blooming 1 (plus 0.3 x radius)
}

#: Mimic parameters. Counts are uniform integer ranges; radii in mm; depth = signal loss.
MIMICS: dict[str, Any] = {
    "cortical_veins": (60, 90), "cortical_vein_radius": (0.6, 1.3),
    "cortical_vein_length_mm": (20.0, 70.0),
    "medullary_veins": (40, 70), "medullary_vein_radius": (0.4, 0.65),
    "medullary_vein_length_mm": (15.0, 35.0),
    "vein_depth": 0.8,
    "p_calcification": 0.18, "calcification_radius": (1.5, 3.5), "calcification_depth": 0.75,
    "p_artefact_frontal": 0.40, "p_artefact_temporal": 0.35,
    "siderosis_radius_mm": (12.0, 24.0), "siderosis_depth": 0.6,
}


# --------------------------------------------------------------------------------------
# Centre profiles
# --------------------------------------------------------------------------------------
class CenterProfileError(ValueError):
    """A centre profile file or mapping is malformed (message names file and field)."""


@dataclass(frozen=True)
class CenterProfile:
    """Acquisition profile of one centre (scanner + protocol).

    Grid: ``inplane_mm`` x ``inplane_mm`` x ``slice_mm`` voxels, ``matrix`` (nx, ny, nz),
    RAS axes tilted by ``tilt_deg`` about the left-right axis (oblique axial). Image:
    ``snr`` (white matter mean / noise sigma), ``gm_wm_ratio`` and ``csf_wm_ratio``
    (tissue contrast), ``iron_contrast`` (signal loss scale of iron nuclei),
    ``vein_contrast`` (scale of venous signal loss), ``blooming`` (halo scale,
    grows with field strength and TE), ``bias_strength`` (bias field amplitude, log
    scale), ``intensity_scale`` (white matter grey value). ``role`` is
    ``development`` or ``external``.
    """

    name: str
    inplane_mm: float
    slice_mm: float
    matrix: tuple[int, int, int]
    snr: float
    gm_wm_ratio: float = 0.82
    csf_wm_ratio: float = 1.35
    iron_contrast: float = 1.0
    vein_contrast: float = 1.0
    blooming: float = 1.0
    bias_strength: float = 0.2
    tilt_deg: float = 0.0
    intensity_scale: float = 400.0
    field_strength_t: float = 3.0
    echo_time_ms: float = 20.0
    role: str = "development"
    description: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (x, y, z) in mm."""
        return (self.inplane_mm, self.inplane_mm, self.slice_mm)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML / JSON friendly)."""
        d = dataclasses.asdict(self)
        d["matrix"] = list(self.matrix)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<mapping>") -> CenterProfile:
        """Validate ``data`` and build a profile; errors name ``source`` and the field."""
        return _profile_from_mapping(data, source)


# (type, lower bound, upper bound) per field; bounds inclusive, None = unbounded.
_PROFILE_FIELDS: dict[str, tuple[type, float | None, float | None]] = {
    "name": (str, None, None),
    "inplane_mm": (float, 0.2, 3.0),
    "slice_mm": (float, 0.2, 8.0),
    "matrix": (tuple, 16, 1024),
    "snr": (float, 1.0, 1000.0),
    "gm_wm_ratio": (float, 0.3, 1.5),
    "csf_wm_ratio": (float, 0.3, 3.0),
    "iron_contrast": (float, 0.0, 2.0),
    "vein_contrast": (float, 0.0, 1.3),
    "blooming": (float, 0.0, 3.0),
    "bias_strength": (float, 0.0, 1.0),
    "tilt_deg": (float, -45.0, 45.0),
    "intensity_scale": (float, 1e-3, 1e6),
    "field_strength_t": (float, 0.1, 15.0),
    "echo_time_ms": (float, 1.0, 200.0),
    "role": (str, None, None),
    "description": (str, None, None),
}
_REQUIRED_FIELDS = ("name", "inplane_mm", "slice_mm", "matrix", "snr")


def _profile_from_mapping(data: Any, source: str) -> CenterProfile:
    if not isinstance(data, Mapping):
        raise CenterProfileError(f"{source}: a centre profile must be a mapping of fields, "
                                 f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(_PROFILE_FIELDS))
    if unknown:
        raise CenterProfileError(f"{source}: unknown field '{unknown[0]}' (known fields: "
                                 f"{', '.join(_PROFILE_FIELDS)})")
    missing = [k for k in _REQUIRED_FIELDS if k not in data]
    if missing:
        raise CenterProfileError(f"{source}: missing required field '{missing[0]}'")
    out: dict[str, Any] = {}
    for key, value in data.items():
        typ, lo, hi = _PROFILE_FIELDS[key]
        where = f"{source}: field '{key}'"
        if typ is str:
            if not isinstance(value, str) or (key == "name" and not value.strip()):
                raise CenterProfileError(f"{where}: expected a non-empty string, got {value!r}")
            if key == "name" and not all(c.isalnum() or c in "-_" for c in value):
                raise CenterProfileError(f"{where}: use letters, digits, '-' or '_' only, "
                                         f"got {value!r}")
            if key == "role" and value not in ("development", "external"):
                raise CenterProfileError(f"{where}: expected 'development' or 'external', "
                                         f"got {value!r}")
            out[key] = value
        elif typ is tuple:
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise CenterProfileError(f"{where}: expected three integers [nx, ny, nz], "
                                         f"got {value!r}")
            if not all(lo <= v <= hi for v in value):
                raise CenterProfileError(f"{where}: each size must be in [{lo}, {hi}], "
                                         f"got {list(value)}")
            out[key] = tuple(int(v) for v in value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise CenterProfileError(f"{where}: expected a number, got {value!r}")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise CenterProfileError(f"{where}: must be in [{lo}, {hi}], got {value!r}")
            out[key] = float(value)
    return CenterProfile(**out)


def load_center_profile(path: str | os.PathLike) -> CenterProfile:
    """Read a centre profile from YAML (``.yaml``/``.yml``) or JSON; validate every field.

    Raises :class:`CenterProfileError` naming the file and the offending field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CenterProfileError(f"{path}: cannot read centre profile ({exc})") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors of either format
        raise CenterProfileError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'} "
                                 f"({exc})") from exc
    return _profile_from_mapping(data, str(path))


def save_center_profile(profile: CenterProfile, path: str | os.PathLike) -> Path:
    """Write ``profile`` as YAML or JSON (by extension); ``load_center_profile`` reads it."""
    path = Path(path)
    data = profile.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    write_text_atomic(path, text)
    return path


#: Built-in centres. A and B: development (3T, 0.9-1.0 mm in-plane, 2.0-2.5 mm slices);
#: C: external, distinct (1.5T-like: lower SNR, 3 mm oblique slices, finer in-plane,
#: other contrast, stronger bias, different gain and blooming).
BUILTIN_CENTERS: dict[str, CenterProfile] = {
    "A": CenterProfile(
        name="A", inplane_mm=0.9, slice_mm=2.0, matrix=(192, 224, 72), snr=24.0,
        gm_wm_ratio=0.80, csf_wm_ratio=1.35, iron_contrast=1.0, vein_contrast=1.0,
        blooming=1.0, bias_strength=0.20, tilt_deg=0.0, intensity_scale=400.0,
        field_strength_t=3.0, echo_time_ms=20.0, role="development",
        description="3T SWI, 0.9 x 0.9 x 2.0 mm, axial",
    ),
    "B": CenterProfile(
        name="B", inplane_mm=1.0, slice_mm=2.5, matrix=(176, 208, 56), snr=20.0,
        gm_wm_ratio=0.84, csf_wm_ratio=1.25, iron_contrast=0.9, vein_contrast=0.9,
        blooming=1.15, bias_strength=0.25, tilt_deg=6.0, intensity_scale=1200.0,
        field_strength_t=3.0, echo_time_ms=25.0, role="development",
        description="3T SWI, 1.0 x 1.0 x 2.5 mm, slightly oblique",
    ),
    "C": CenterProfile(
        name="C", inplane_mm=0.8, slice_mm=3.0, matrix=(224, 256, 48), snr=14.0,
        gm_wm_ratio=0.88, csf_wm_ratio=1.5, iron_contrast=0.7, vein_contrast=0.75,
        blooming=0.75, bias_strength=0.40, tilt_deg=14.0, intensity_scale=90.0,
        field_strength_t=1.5, echo_time_ms=40.0, role="external",
        description="1.5T SWI, 0.8 x 0.8 x 3.0 mm, AC-PC oblique (external centre)",
    ),
}


def resolve_centers(
    names: Iterable[str] | None = None,
    profile_files: Iterable[str | os.PathLike] = (),
) -> list[CenterProfile]:
    """Centres to generate: built-in names and/or profile files.

    ``names`` None -> ``A, B, C`` when no file is given, else only the files' centres.
    A name that matches a file's profile uses that profile; file centres not named are
    appended.
    """
    from_files = [load_center_profile(p) for p in profile_files]
    by_name = dict(BUILTIN_CENTERS)
    for prof in from_files:
        by_name[prof.name] = prof
    if names is None:
        names = [p.name for p in from_files] if from_files else list(BUILTIN_CENTERS)
    names = [n.strip() for n in names if n.strip()]
    out: list[CenterProfile] = []
    for n in names:
        if n not in by_name:
            raise CenterProfileError(f"unknown centre '{n}' (built-in: "
                                     f"{', '.join(BUILTIN_CENTERS)}; or give --center-profile)")
        out.append(by_name[n])
    for prof in from_files:
        if prof.name not in names:
            out.append(prof)
    if len({p.name for p in out}) != len(out):
        raise CenterProfileError("centre names must be unique: " + ", ".join(p.name for p in out))
    return out


# --------------------------------------------------------------------------------------
# Template (loaded once per process)
# --------------------------------------------------------------------------------------
_PAD_INFERIOR = 24  # mm of (brain-free) head added below the template
_TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
                   for k in ("t1", "gm", "wm")}

# brainstem cross-section by height z (MNI mm): half-width |x|, y min, y max
_BRAINSTEM_TABLE = np.array([
    # z,  hw,  ylo,  yhi
    [-65, 7, -48, -36], [-60, 9, -48, -33], [-55, 10, -47, -31], [-50, 11, -46, -27],
    [-45, 12, -46, -20], [-40, 13, -45, -16], [-35, 14, -42, -14], [-30, 14, -40, -13],
    [-25, 15, -37, -13], [-20, 15, -36, -17], [-15, 14, -38, -26], [-10, 12, -39, -27],
    [-5, 10, -37, -29], [0, 9, -37, -29],
], dtype=np.float32)

# Iron-rich nuclei: (centre |x|, y, z), semi-axes, signal-loss strength, age-dependent?
_IRON_NUCLEI: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float, bool],
                    ...] = (
    ((19.0, -4.0, -1.0), (4.5, 8.0, 4.5), 0.55, False),   # globus pallidus
    ((11.0, -17.0, -12.0), (3.5, 6.0, 3.0), 0.50, False),  # substantia nigra
    ((5.0, -20.0, -8.0), (3.0, 3.5, 3.5), 0.45, False),    # red nucleus
    ((14.0, -57.0, -34.0), (6.0, 8.0, 5.0), 0.45, False),  # dentate nucleus
    ((25.0, 1.0, 1.0), (6.0, 14.0, 8.0), 0.22, True),      # putamen (age)
    ((13.0, 12.0, 10.0), (4.5, 9.0, 8.0), 0.12, True),     # caudate head (age)
    ((14.0, -27.0, 6.0), (5.0, 5.0, 5.0), 0.15, True),     # pulvinar (age)
)

# Deep venous system and dural sinuses (MNI mm), mirrored where "bilateral".
_DEEP_VEINS: tuple[tuple[str, bool, float, tuple[tuple[float, float, float], ...]], ...] = (
    ("internal_cerebral", True, 1.1,
     ((3.0, 2.0, 14.0), (3.0, -10.0, 13.0), (2.5, -25.0, 10.0), (1.5, -38.0, 6.0))),
    ("thalamostriate", True, 0.8,
     ((17.0, 8.0, 20.0), (14.0, -2.0, 18.0), (8.0, 2.0, 15.0), (3.0, 2.0, 14.0))),
    ("basal_rosenthal", True, 1.1,
     ((20.0, 3.0, -12.0), (17.0, -12.0, -10.0), (14.0, -28.0, -3.0), (6.0, -40.0, 3.0),
      (0.0, -44.0, 4.0))),
    ("galen_straight", False, 1.8,
     ((0.0, -40.0, 5.0), (0.0, -50.0, 1.0), (0.0, -62.0, -4.0), (0.0, -78.0, -10.0),
      (0.0, -96.0, -18.0))),
    ("transverse", True, 3.0,
     ((0.0, -104.0, -20.0), (25.0, -103.0, -22.0), (45.0, -88.0, -27.0),
      (57.0, -66.0, -32.0), (57.0, -52.0, -44.0))),
)


def template_dir() -> Path:
    """Folder of the ICBM152 2009a maps inside the installed ``nilearn`` package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it ships the ICBM152 template")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in _TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing from the nilearn package")
    return folder


@dataclass
class Template:
    """ICBM152 2009a anatomy, region maps and mimic geometry (MNI mm, 1 mm voxels)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # float32 0/1
    dist_in: np.ndarray  # mm to the brain surface, inside
    dist_out: np.ndarray  # mm outside the head hull (< 0: -mm from brain, in hull)
    region: np.ndarray  # int8 subregion codes (``_SUB_CODE``), 0 outside
    iron_fixed: np.ndarray
    iron_age: np.ndarray
    candidates: dict[str, np.ndarray]  # subregion -> flat voxel indices for CMB centres
    sulcal_pts: np.ndarray  # (n, 3) MNI mm, sulcal CSF
    sulcal_tree: cKDTree
    ventricle_seeds: np.ndarray  # (n, 3) MNI mm, WM at the lateral ventricle wall
    ventricle_normals: np.ndarray  # (n, 3) outward unit vectors
    pial_pts: np.ndarray  # (n, 3) MNI mm, cortical surface (lobar)
    pial_lobe: np.ndarray  # (n,) subregion code
    sss: np.ndarray  # superior sagittal sinus polyline (n, 3)
    _base_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def mm_to_vox(self, pts: np.ndarray) -> np.ndarray:
        """MNI mm (n, 3) -> template voxel coordinates (n, 3)."""
        inv = self.__dict__.get("_inv_affine")
        if inv is None:
            inv = self.__dict__["_inv_affine"] = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def lookup(self, arr: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """Nearest-voxel values of ``arr`` at MNI points (0 outside)."""
        v = np.rint(self.mm_to_vox(pts)).astype(np.int64)
        ok = np.all((v >= 0) & (v < np.array(self.shape)), axis=1)
        out = np.zeros(len(pts), dtype=arr.dtype)
        out[ok] = arr[v[ok, 0], v[ok, 1], v[ok, 2]]
        return out

    def base_intensity(self, profile: CenterProfile) -> tuple[np.ndarray, np.ndarray]:
        """(base, age_term) SWI-like intensity maps for ``profile`` (WM = 1), cached.

        Patient intensity = base - age_factor * age_term. Blurred along z to the
        centre's slice profile.
        """
        key = (profile.gm_wm_ratio, profile.csf_wm_ratio, profile.iron_contrast,
               profile.slice_mm)
        if key not in self._base_cache:
            self._base_cache[key] = _make_base_intensity(self, profile)
        return self._base_cache[key]


_TEMPLATE: Template | None = None


def get_template() -> Template:
    """The process-wide :class:`Template` (built on first use, a few seconds)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _build_template()
    return _TEMPLATE


def _ellipsoid_q(coords: tuple[np.ndarray, np.ndarray, np.ndarray],
                 centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    ax, y, z = coords
    return (((ax - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
            + ((z - centre[2]) / semi[2]) ** 2)


def _build_template() -> Template:
    folder = template_dir()
    imgs = {k: nib.load(str(folder / v)) for k, v in _TEMPLATE_FILES.items()}
    affine = imgs["t1"].affine.astype(np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) \
            or np.any(np.diag(affine)[:3] <= 0):
        raise RuntimeError("expected a RAS, axis-aligned template affine")
    # the template stops at z = -72 mm: pad below so the head continues into a neck
    zpad = ((0, 0), (0, 0), (_PAD_INFERIOR, 0))
    t1 = np.pad(np.asarray(imgs["t1"].dataobj), zpad)
    gm = np.pad(np.asarray(imgs["gm"].dataobj, dtype=np.float32) / np.float32(255), zpad)
    wm = np.pad(np.asarray(imgs["wm"].dataobj, dtype=np.float32) / np.float32(255), zpad)
    affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -_PAD_INFERIOR],
                                [0, 0, 0, 1]], dtype=np.float64)
    shape = t1.shape
    brain_b = t1 > 0
    gm *= brain_b
    wm *= brain_b
    tot = gm + wm
    over = tot > 1
    if over.any():
        gm[over] /= tot[over]
        wm[over] /= tot[over]
    csf = np.clip(brain_b.astype(np.float32) - gm - wm, 0, 1)

    # distances (EDT at 2 mm, interpolated back: ~1 mm precision is plenty here).
    # The skull and scalp wrap a closed hull of the brain (24 mm closing, holes filled
    # per axial slice), so one head surrounds temporal poles, brainstem and cerebellum
    # at the skull base; hull voxels outside the brain are dark skull-base tissue.
    small = brain_b[::2, ::2, ::2]
    d_in = ndi.distance_transform_edt(small) * 2.0
    pad = 14
    outside = np.pad(~small, pad, constant_values=True)
    z0 = pad + _PAD_INFERIOR // 2  # first real template slice (2 mm grid)
    outside_h = outside.copy()
    outside_h[:, :, :z0] = outside[:, :, z0: z0 + 1]  # neck: repeat the lowest outline
    d_brain = ndi.distance_transform_edt(outside) * 2.0
    dil = ndi.distance_transform_edt(outside_h) * 2.0 <= 24.0
    hull = (ndi.distance_transform_edt(dil) * 2.0 > 24.0) | ~outside_h
    for k in range(hull.shape[2]):
        hull[:, :, k] = ndi.binary_fill_holes(hull[:, :, k])
    crop = (slice(pad, -pad),) * 3
    hull, d_brain = hull[crop], d_brain[crop]
    # below MNI z = -30 the head does not narrow around the temporal poles: extrude the
    # outline downwards (skull base, face, neck)
    k_top = int(round((-30.0 - affine[2, 3]) / (2 * affine[2, 2])))
    for k in range(min(k_top, hull.shape[2] - 1) - 1, -1, -1):
        hull[:, :, k] |= hull[:, :, k + 1]
    d_out = ndi.distance_transform_edt(~hull) * 2.0
    zoom = [s / float(n) for s, n in zip(shape, small.shape, strict=True)]

    def up(a: np.ndarray) -> np.ndarray:
        return ndi.zoom(a.astype(np.float32), zoom, order=1)[: shape[0], : shape[1], : shape[2]]

    dist_in = np.where(brain_b, np.maximum(up(d_in), 0.5), 0).astype(np.float32)
    hull_f = up(hull.astype(np.float32))
    dist_out = np.where(brain_b, 0, up(d_out)).astype(np.float32)
    # inside the hull, outside the brain: minus the distance to the brain
    inner = (hull_f >= 0.5) & ~brain_b
    dist_out[inner] = -np.maximum(up(d_brain)[inner], 0.5)

    region = _region_map(affine, shape, brain_b, gm, wm, csf, dist_in)
    iron_fixed, iron_age = _iron_maps(affine, shape, csf, brain_b)

    # CMB centre candidates: tissue voxels of each subregion
    tissue = (gm + wm) >= 0.7
    flat_region = region.ravel()
    flat_ok = tissue.ravel() & (dist_in.ravel() >= 2.5)
    candidates = {}
    for name, code in _SUB_CODE.items():
        candidates[name] = np.flatnonzero(flat_ok & (flat_region == code))

    def mm_of(mask: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(mask.ravel())
        ijk = np.stack(np.unravel_index(idx, shape), axis=1).astype(np.float64)
        return (ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)

    infra = (region == _SUB_CODE["brainstem"]) | (region == _SUB_CODE["cerebellum"])
    sulcal = (csf > 0.4) & (dist_in <= 14) & (dist_in >= 1.0)
    sulcal_pts = mm_of(sulcal)
    sulcal_tree = cKDTree(sulcal_pts)
    lobar_codes = [_SUB_CODE[n] for n, g in SUBREGIONS.items() if g == "lobar"]
    lobar = np.isin(region, lobar_codes)
    pial = lobar & (gm > 0.35) & (csf > 0.25) & (dist_in <= 10) & ~infra
    pial_pts = mm_of(pial)
    pial_lobe = region[pial].astype(np.int8)

    seeds, normals = _ventricle_seeds(affine, shape, csf, wm, dist_in, region)
    sss = _sss_polyline(affine, brain_b)
    logger.info("template ready: %d brain voxels, %d sulcal points, %d pial points",
                int(brain_b.sum()), len(sulcal_pts), len(pial_pts))
    return Template(
        affine=affine, shape=tuple(shape), gm=gm, wm=wm, csf=csf,
        brain=brain_b.astype(np.float32), dist_in=dist_in, dist_out=dist_out,
        region=region, iron_fixed=iron_fixed, iron_age=iron_age, candidates=candidates,
        sulcal_pts=sulcal_pts, sulcal_tree=sulcal_tree, ventricle_seeds=seeds,
        ventricle_normals=normals, pial_pts=pial_pts, pial_lobe=pial_lobe, sss=sss,
    )


def _grid_mm(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Sparse (x, y, z) MNI coordinate grids of an axis-aligned affine."""
    return tuple(
        (np.arange(n, dtype=np.float32) * np.float32(affine[i, i]) + np.float32(affine[i, 3]))
        .reshape([-1 if j == i else 1 for j in range(3)])
        for i, n in enumerate(shape)
    )


def _region_map(affine: np.ndarray, shape: Sequence[int], brain: np.ndarray,
                gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                dist_in: np.ndarray) -> np.ndarray:
    """Subregion codes per template voxel (rule in the module docstring)."""
    x, y, z = _grid_mm(affine, shape)
    ax = np.abs(x)
    code = _SUB_CODE
    region = np.zeros(shape, dtype=np.int8)

    zt, hw, ylo, yhi = _BRAINSTEM_TABLE.T
    zz = z.ravel()
    hw_z = np.interp(zz, zt, hw).reshape(z.shape)
    ylo_z = np.interp(zz, zt, ylo).reshape(z.shape) - 1
    yhi_z = np.interp(zz, zt, yhi).reshape(z.shape) + 1
    stem = brain & (ax < hw_z) & (y > ylo_z) & (y < yhi_z) & (z < -3)
    cereb = brain & ~stem & (y < -30) & (z < -6 - 0.4 * ax - 0.015 * (y + 60) ** 2)
    supra = brain & ~stem & ~cereb

    # lobar lobes (applied to all supratentorial voxels, deep ones overwritten below)
    temporal = (ax > 20) & (z < -4 - 0.4 * y)
    occipital = (y < -64 - 0.3 * z)
    frontal = (y > 6 - 0.6 * z)
    lobe = np.full(shape, code["parietal"], dtype=np.int8)
    lobe = np.where(frontal, np.int8(code["frontal"]), lobe)
    lobe = np.where(occipital, np.int8(code["occipital"]), lobe)
    lobe = np.where(temporal & ~occipital, np.int8(code["temporal"]), lobe)
    region[supra] = lobe[supra]

    # deep structures live in a central box; compute there only
    xs = np.flatnonzero(np.abs(x.ravel()) <= 47)
    ys = np.flatnonzero((y.ravel() >= -60) & (y.ravel() <= 45))
    zs = np.flatnonzero((z.ravel() >= -25) & (z.ravel() <= 45))
    box = (slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(zs[0], zs[-1] + 1))
    bx, by, bz = ax[box[0]], y[:, box[1]], z[:, :, box[2]]
    c3 = (bx, by, bz)
    s_sup, s_gm, s_wm, s_csf, s_din = supra[box], gm[box], wm[box], csf[box], dist_in[box]
    notcsf = s_csf < 0.5
    thal = s_sup & notcsf & (_ellipsoid_q(c3, (11.5, -18.5, 7.5), (9.5, 15.5, 9.5)) <= 1)
    striat = ((_ellipsoid_q(c3, (13, 10, 12), (6, 13, 11)) <= 1)
              | (_ellipsoid_q(c3, (22, 1, 1), (10, 16, 10)) <= 1))
    bg = s_sup & striat & (s_gm >= s_wm) & notcsf & ~thal
    whiteish = s_wm > s_gm
    ic = s_sup & whiteish & ~bg & ~thal & (_ellipsoid_q(c3, (21, -8, 8), (13, 28, 14)) <= 1)
    ec = (s_sup & whiteish & ~bg & ~ic & ~thal & (bx >= 27) & (bx <= 34) & (by > -20)
          & (by < 22) & (bz > -12) & (bz < 18))
    cc = (s_sup & whiteish & ~ic & ~thal & ~bg & ~ec & (bx <= 12) & (by > -42) & (by < 36)
          & (bz > 0) & (bz < 34))
    insula_box = (bx >= 29) & (bx <= 46) & (by > -20) & (by < 30) & (bz > -15) & (bz < 20)
    sub = region[box]
    sub[s_sup & insula_box & (s_din >= 8)] = code["insula"]
    deep_grey = bg | thal
    # deep WM needs the distance to cortical GM (whole supratentorium)
    cortex = supra & (gm > 0.5)
    cortex[box] &= ~deep_grey
    small = ~cortex[::2, ::2, ::2]
    d_ctx_small = ndi.distance_transform_edt(small) * 2.0
    d_ctx = np.repeat(np.repeat(np.repeat(d_ctx_small, 2, 0), 2, 1), 2, 2)[
        : shape[0], : shape[1], : shape[2]]
    dwm_all = supra & (wm >= gm) & (dist_in >= 15) & (d_ctx > 2)
    dwm = dwm_all[box] & ~(insula_box & (s_din >= 8))
    outside_box = dwm_all.copy()
    outside_box[box] = False
    region[outside_box] = code["deep_wm"]
    sub[dwm] = code["deep_wm"]
    sub[cc] = code["corpus_callosum"]
    sub[ec] = code["external_capsule"]
    sub[ic] = code["internal_capsule"]
    sub[bg] = code["basal_ganglia"]
    sub[thal] = code["thalamus"]
    region[box] = sub
    region[stem] = code["brainstem"]
    region[cereb] = code["cerebellum"]
    return region


def _iron_maps(affine: np.ndarray, shape: Sequence[int], csf: np.ndarray,
               brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft-edged iron maps (signal-loss fraction): fixed nuclei and age-dependent ones."""
    x, y, z = _grid_mm(affine, shape)
    fixed = np.zeros(shape, dtype=np.float32)
    aged = np.zeros(shape, dtype=np.float32)
    inv = np.linalg.inv(affine)
    for centre, semi, strength, age_dep in _IRON_NUCLEI:
        for sign in (1.0, -1.0):
            c = np.array([sign * centre[0], centre[1], centre[2]])
            lo = np.floor(inv[:3, :3] @ (c - np.array(semi) * 1.6) + inv[:3, 3]).astype(int)
            hi = np.ceil(inv[:3, :3] @ (c + np.array(semi) * 1.6) + inv[:3, 3]).astype(int) + 1
            lo = np.maximum(lo, 0)
            hi = np.minimum(hi, shape)
            sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            q = (((x[sl[0]] - c[0]) / semi[0]) ** 2 + ((y[:, sl[1]] - c[1]) / semi[1]) ** 2
                 + ((z[:, :, sl[2]] - c[2]) / semi[2]) ** 2)
            w = strength * np.clip((1.45 - np.sqrt(q)) / 0.45, 0, 1) ** 1.5
            target = aged if age_dep else fixed
            target[sl] = np.maximum(target[sl], w.astype(np.float32))
    keep = (1 - csf) * brain
    return fixed * keep, aged * keep


def _ventricle_seeds(affine: np.ndarray, shape: Sequence[int], csf: np.ndarray,
                     wm: np.ndarray, dist_in: np.ndarray,
                     region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WM voxels on the lateral-ventricle wall and outward normals (medullary veins)."""
    x, y, z = _grid_mm(affine, shape)
    inv = np.linalg.inv(affine)
    lo = np.floor(inv[:3, :3] @ np.array([-35.0, -50, -5]) + inv[:3, 3]).astype(int)
    hi = np.ceil(inv[:3, :3] @ np.array([35.0, 35, 35]) + inv[:3, 3]).astype(int)
    sl = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, shape, strict=True))
    vent = (csf[sl] > 0.5) & (dist_in[sl] > 10)
    vent = ndi.binary_opening(vent, iterations=1)
    wall = ndi.binary_dilation(vent, iterations=2) & ~vent & (wm[sl] > 0.4)
    wall &= np.abs(x[sl[0]]) > 4  # lateral walls, not the septum
    wall &= np.broadcast_to(z[:, :, sl[2]], wall.shape) > 4  # body of the ventricles
    smooth = ndi.gaussian_filter(vent.astype(np.float32), 3.0)
    g = np.stack(np.gradient(smooth), axis=-1)[wall]
    ijk = np.argwhere(wall) + np.array([s.start for s in sl])
    pts = ijk @ affine[:3, :3].T + affine[:3, 3]
    n = -g
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    ok = norm[:, 0] > 1e-6
    return pts[ok].astype(np.float32), (n[ok] / norm[ok]).astype(np.float32)


def _sss_polyline(affine: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Superior sagittal sinus: 3 mm outside the brain's midline outline."""
    inv = np.linalg.inv(affine)
    i0 = int(round(inv[0, 3]))  # x = 0
    mid = brain[max(i0 - 2, 0): i0 + 3].any(axis=0)  # (y, z)
    pts = []
    for j in range(0, mid.shape[0], 4):
        ks = np.flatnonzero(mid[j])
        if len(ks) == 0:
            continue
        ymm = j * affine[1, 1] + affine[1, 3]
        zmm = ks[-1] * affine[2, 2] + affine[2, 3]
        if zmm < 5:
            continue
        pts.append((0.0, ymm, zmm + 3.5))
    return np.asarray(pts, dtype=np.float32)


def _make_base_intensity(tpl: Template, profile: CenterProfile) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Template-space SWI-like intensity (WM = 1) for a centre's contrast."""
    gmv, csfv = profile.gm_wm_ratio, profile.csf_wm_ratio
    base = tpl.wm + np.float32(gmv) * tpl.gm + np.float32(csfv) * tpl.csf
    # head outside the brain: meninges/CSF, skull (inner/outer table dark, diploe), scalp
    d = tpl.dist_out
    head = np.interp(d, [-100.0, -6.0, -3.0, -1.5, -0.01, 0.0, 1.0, 2.0, 3.0, 4.5, 6.0,
                         7.0, 8.5, 10.5, 12.0, 13.5],
                     [0.22, 0.22, 0.12, 0.5, 0.8 * csfv, 0.9 * csfv, 0.8 * csfv, 0.10, 0.10,
                      0.30, 0.08, 0.55, 0.80, 0.62, 0.0, 0.0]).astype(np.float32)
    base += head * (1 - tpl.brain)
    ic = np.float32(profile.iron_contrast)
    base *= 1 - ic * tpl.iron_fixed
    age_term = base * (ic * tpl.iron_age)
    sigma_z = math.sqrt(max(profile.slice_mm ** 2 - 1.0, 0.0)) / 2.355 / tpl.affine[2, 2]
    if sigma_z > 0.3:
        base = ndi.gaussian_filter1d(base, sigma_z, axis=2, mode="constant")
        age_term = ndi.gaussian_filter1d(age_term, sigma_z, axis=2, mode="constant")
    return base.astype(np.float32), age_term.astype(np.float32)


def mars_agreement(mars_path: str | os.PathLike) -> dict[str, Any]:
    """Agreement of the template region map with the MARS atlas (label = rint(sqrt(v))).

    Over template tissue voxels (GM + WM >= 0.5) labelled in both: fraction sharing the
    MARS group (lobar / deep / infratentorial), per-group Dice, and the fraction
    sharing the subregion.
    """
    tpl = get_template()
    img = nib.load(str(mars_path))
    lab_img = np.rint(np.sqrt(np.clip(np.asarray(img.dataobj, dtype=np.float32), 0, None)))
    m = np.linalg.inv(img.affine) @ tpl.affine
    idx = np.indices(tpl.shape, dtype=np.float32).reshape(3, -1)
    coords = m[:3, :3] @ idx + m[:3, 3:]
    mars = ndi.map_coordinates(lab_img, coords, order=0, cval=0).reshape(tpl.shape)
    mars = mars.astype(np.int16)
    valid = ((tpl.gm + tpl.wm) >= 0.5) & (mars > 0) & (tpl.region > 0)
    group_of_code = np.zeros(len(_SUB_NAMES) + 1, dtype=np.int8)
    for name, c in _SUB_CODE.items():
        group_of_code[c] = REGIONS.index(SUBREGIONS[name]) + 1
    ours = group_of_code[tpl.region[valid]]
    theirs = group_of_code[np.clip(mars[valid], 0, len(_SUB_NAMES))]
    out: dict[str, Any] = {
        "n_voxels": int(valid.sum()),
        "group_accuracy": float((ours == theirs).mean()),
        "subregion_accuracy": float((tpl.region[valid] == mars[valid]).mean()),
    }
    for gi, g in enumerate(REGIONS, start=1):
        a, b = ours == gi, theirs == gi
        out[f"dice_{g}"] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return out


# --------------------------------------------------------------------------------------
# Per-patient geometry: pose + deformation composed with the centre grid
# --------------------------------------------------------------------------------------
_DEF_ORDER = 4  # cosine basis orders 0..3 per axis
_DEF_LENGTH = 220.0  # mm
_BIAS_ORDER = 3
_HEAD_CENTRE = np.array([0.0, -18.0, 8.0])


def _rot(ax: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    if ax == 1:
        r = r.T
    return r


def _cos_basis(u: np.ndarray, order: int, length: float) -> np.ndarray:
    """(len(u), order) cosine basis over [-length/2, length/2]."""
    t = (np.asarray(u, dtype=np.float64)[:, None] + length / 2) / length
    return np.cos(np.pi * np.arange(order)[None, :] * t)


@dataclass
class Geometry:
    """Output grid and the patient's template <-> world mapping."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> world (RAS mm)
    spacing: np.ndarray
    rot_tilt: np.ndarray
    grid_centre: np.ndarray
    q: np.ndarray  # world -> template linear part (scale^-1 R^T)
    q_inv: np.ndarray
    translation: np.ndarray
    def_coef: np.ndarray  # (3, K, K, K) displacement coefficients, mm
    bias_coef: np.ndarray  # (B, B, B) log-bias coefficients

    def grid_u(self, axis: int) -> np.ndarray:
        """Grid-frame mm coordinate along ``axis`` of every voxel index."""
        n = self.shape[axis]
        return (np.arange(n) - (n - 1) / 2.0) * self.spacing[axis]

    def world_to_u(self, w: np.ndarray) -> np.ndarray:
        return (w - self.grid_centre) @ self.rot_tilt  # R^T (w - c0)

    def displacement(self, w: np.ndarray) -> np.ndarray:
        """Displacement (mm, template frame) at world points (n, 3)."""
        u = self.world_to_u(w)
        bx, by, bz = (_cos_basis(u[:, i], _DEF_ORDER, _DEF_LENGTH) for i in range(3))
        basis = (bx[:, :, None, None] * by[:, None, :, None] * bz[:, None, None, :])
        return basis.reshape(len(u), -1) @ self.def_coef.reshape(3, -1).T

    def world_to_template(self, w: np.ndarray) -> np.ndarray:
        """World RAS mm (n, 3) -> template MNI mm."""
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        return (_HEAD_CENTRE + (w - _HEAD_CENTRE - self.translation) @ self.q.T
                + self.displacement(w))

    def template_to_world(self, m: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Template MNI mm (n, 3) -> world RAS mm (fixed-point inverse of the deformation)."""
        m = np.atleast_2d(np.asarray(m, dtype=np.float64))
        w = _HEAD_CENTRE + self.translation + (m - _HEAD_CENTRE) @ self.q_inv.T
        for _ in range(iterations):
            d = self.displacement(w)
            w = _HEAD_CENTRE + self.translation + (m - _HEAD_CENTRE - d) @ self.q_inv.T
        return w

    def world_to_vox(self, w: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        return np.asarray(w) @ inv[:3, :3].T + inv[:3, 3]

    def template_voxel_coords(self, tpl: Template) -> np.ndarray:
        """(3, nx, ny, nz) float32 template voxel coordinates of every output voxel."""
        inv_t = np.linalg.inv(tpl.affine)
        lin = inv_t[:3, :3] @ self.q @ self.rot_tilt @ np.diag(self.spacing)  # per index
        centre_idx = (np.array(self.shape) - 1) / 2.0
        m0 = (_HEAD_CENTRE + self.q @ (self.grid_centre - _HEAD_CENTRE - self.translation))
        off = inv_t[:3, :3] @ m0 + inv_t[:3, 3] - lin @ centre_idx
        bases = [_cos_basis(self.grid_u(i), _DEF_ORDER, _DEF_LENGTH) for i in range(3)]
        idx = [np.arange(n, dtype=np.float64) for n in self.shape]
        out = np.empty((3,) + self.shape, dtype=np.float32)
        scale = np.diag(inv_t[:3, :3])
        for c in range(3):
            d = np.einsum("lmn,il,jm,kn->ijk", self.def_coef[c] * scale[c], *bases,
                          optimize=True)
            plane = (lin[c, 0] * idx[0][:, None] + lin[c, 1] * idx[1][None, :] + off[c])
            out[c] = d
            out[c] += plane[:, :, None].astype(np.float32)
            out[c] += (lin[c, 2] * idx[2]).astype(np.float32)[None, None, :]
        return out

    def bias_field(self) -> np.ndarray:
        """Smooth multiplicative bias field on the output grid."""
        bases = [_cos_basis(self.grid_u(i), _BIAS_ORDER, 260.0) for i in range(3)]
        logb = np.einsum("lmn,il,jm,kn->ijk", self.bias_coef, *bases, optimize=True)
        return np.exp(logb).astype(np.float32)


def _make_geometry(profile: CenterProfile, rng: np.random.Generator) -> Geometry:
    spacing = np.array(profile.spacing, dtype=np.float64)
    shape = tuple(int(v) for v in profile.matrix)
    rot_tilt = _rot(0, profile.tilt_deg + rng.normal(0, 2.0))
    grid_centre = _HEAD_CENTRE + np.array([0.0, 0.0, 2.0]) + rng.normal(0, 2.0, 3)
    centre_idx = (np.array(shape) - 1) / 2.0
    lin = rot_tilt @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = grid_centre - lin @ centre_idx
    scale = rng.uniform(0.93, 1.07, 3)
    head_rot = _rot(2, rng.normal(0, 4.0)) @ _rot(1, rng.normal(0, 3.0)) @ _rot(
        0, rng.normal(0, 4.0))
    q_inv = head_rot @ np.diag(scale)  # template -> world
    q = np.linalg.inv(q_inv)
    translation = rng.normal(0, 3.0, 3)
    k = np.arange(_DEF_ORDER)
    freq = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    amp = np.where(freq > 0, 2.2 / (1 + freq) ** 1.2, 0.0)
    def_coef = rng.normal(0, 1, (3,) + freq.shape) * amp
    b = np.arange(_BIAS_ORDER)
    bfreq = b[:, None, None] + b[None, :, None] + b[None, None, :]
    bamp = np.where(bfreq > 0, profile.bias_strength / (1 + bfreq), 0.0)
    bias_coef = rng.normal(0, 1, bfreq.shape) * bamp
    return Geometry(shape=shape, affine=affine, spacing=spacing, rot_tilt=rot_tilt,
                    grid_centre=grid_centre, q=q, q_inv=q_inv, translation=translation,
                    def_coef=def_coef, bias_coef=bias_coef)


# --------------------------------------------------------------------------------------
# Planning: lesions and mimics (cheap, no volume rendering)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatientSpec:
    """Who to generate: id, centre name, class label and an independent seed."""

    patient_id: str
    center: str
    label: str
    seed: np.random.SeedSequence


@dataclass
class Lesion:
    """One simulated CMB (world RAS mm)."""

    lesion_id: int
    subregion: str
    diameter_mm: float
    centre: np.ndarray  # world mm
    semi_axes: np.ndarray  # mm
    rotation: np.ndarray  # 3x3, columns = axes directions

    @property
    def region(self) -> str:
        return SUBREGIONS[self.subregion]

    @property
    def radius_max(self) -> float:
        return float(self.semi_axes.max())


@dataclass
class Tube:
    """A vessel or siderosis track: dense world points with a radius each."""

    kind: str
    points: np.ndarray  # (n, 3) world mm
    radius: np.ndarray  # (n,)
    depth: float


@dataclass
class Blob:
    """Susceptibility artefact: anisotropic Gaussian signal loss (world mm)."""

    centre: np.ndarray
    sigma: np.ndarray  # (3,) mm along the world axes
    depth: float

    def attenuation(self, w: np.ndarray) -> np.ndarray:
        q = (((np.asarray(w) - self.centre) / self.sigma) ** 2).sum(axis=-1)
        return self.depth * np.exp(-0.5 * q)


@dataclass
class PatientPlan:
    """Everything needed to render one patient (no image data)."""

    spec: PatientSpec
    profile: CenterProfile
    age: float
    pattern: str
    geometry: Geometry
    lesions: list[Lesion]
    tubes: list[Tube]
    calcifications: list[Lesion]
    artefacts: list[Blob]
    siderosis: bool
    gamma: float
    gain: float
    n_requested: int = 0  # CMBs sampled before placement (placed: len(lesions))

    @property
    def n_cmb(self) -> int:
        return len(self.lesions)


def _child_seed(seq: np.random.SeedSequence, k: int) -> np.random.SeedSequence:
    """A fixed child of ``seq`` (unlike ``spawn``, does not depend on earlier calls)."""
    return np.random.SeedSequence(seq.entropy, spawn_key=tuple(seq.spawn_key) + (k,))


def _neg_binomial(rng: np.random.Generator, mean: float, k: float) -> int:
    p = k / (k + mean)
    return int(rng.negative_binomial(k, p))


def _choose(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _dense_polyline(pts: np.ndarray, step: float) -> np.ndarray:
    """Resample a polyline at ``step`` mm (linear)."""
    pts = np.asarray(pts, dtype=np.float64)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return pts[:1]
    t = np.arange(0.0, s[-1] + 1e-9, step)
    return np.stack([np.interp(t, s, pts[:, i]) for i in range(3)], axis=1)


def _smooth_path(pts: np.ndarray, passes: int = 3) -> np.ndarray:
    p = np.asarray(pts, dtype=np.float64)
    for _ in range(passes):
        if len(p) < 3:
            break
        p = np.concatenate([p[:1], (p[:-2] + 2 * p[1:-1] + p[2:]) / 4.0, p[-1:]])
    return p


def _trace_cortical_veins(tpl: Template, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Random walks snapped to sulcal CSF (MNI mm), vectorised over veins."""
    pts = tpl.sulcal_pts
    start = pts[rng.integers(0, len(pts), n)].astype(np.float64)
    lengths = rng.uniform(*MIMICS["cortical_vein_length_mm"], n)
    step = 1.5
    d = rng.normal(0, 1, (n, 3))
    d[:, 2] *= 1.5  # favour vertical runs (seen as dots over many slices)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    paths = [[p] for p in start]
    alive = np.ones(n, bool)
    cur = start.copy()
    for it in range(int(lengths.max() / step) + 1):
        prop = cur + step * d
        dist, idx = tpl.sulcal_tree.query(prop)
        snapped = pts[idx].astype(np.float64)
        alive &= (dist < 3.0) & (it * step < lengths)
        move = snapped - cur
        mlen = np.linalg.norm(move, axis=1, keepdims=True)
        new_d = 0.65 * d + 0.35 * np.where(mlen > 0, move / np.maximum(mlen, 1e-6), d)
        new_d += rng.normal(0, 0.12, new_d.shape)
        new_d /= np.linalg.norm(new_d, axis=1, keepdims=True)
        stuck = mlen[:, 0] < 0.5
        for i in np.flatnonzero(alive & ~stuck):
            paths[i].append(snapped[i])
        cur = np.where((alive & ~stuck)[:, None], snapped, prop)
        d = new_d
        if not alive.any():
            break
    return [_smooth_path(np.asarray(p)) for p in paths if len(p) >= 6]


def _trace_medullary_veins(tpl: Template, rng: np.random.Generator,
                           n: int) -> list[np.ndarray]:
    """Thin veins from the lateral-ventricle wall outwards through WM (MNI mm)."""
    seeds = tpl.ventricle_seeds
    pick = rng.integers(0, len(seeds), n)
    p = seeds[pick].astype(np.float64)
    d = tpl.ventricle_normals[pick] + rng.normal(0, 0.25, (n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    bend = rng.normal(0, 0.02, (n, 3))
    steps = rng.uniform(*MIMICS["medullary_vein_length_mm"], n).astype(int)
    track = [p.copy()]
    alive = np.ones(n, bool)
    stop = np.full(n, steps.max() + 1)
    for it in range(int(steps.max())):
        p = p + d
        d = d + bend
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        leaving = (tpl.lookup(tpl.wm, p) < 0.35) | (it >= steps)
        newly = alive & leaving
        stop[newly] = it + 1
        alive &= ~leaving
        track.append(p.copy())
        if not alive.any():
            break
    arr = np.stack(track, axis=1)  # (n, steps, 3)
    return [arr[i, : stop[i]] for i in range(n) if stop[i] >= 6]


def _plan_mimics(tpl: Template, geo: Geometry, rng: np.random.Generator,
                 profile: CenterProfile, age: float,
                 siderosis_lobe: str | None) -> tuple[list[Tube], list[Lesion], list[Blob]]:
    step = 0.45 * float(min(geo.spacing))
    depth = MIMICS["vein_depth"] * profile.vein_contrast
    tubes: list[Tube] = []

    pending: list[tuple[str, np.ndarray, float, float]] = []

    def add_path(kind: str, mni_path: np.ndarray, r: float, dep: float = depth) -> None:
        pending.append((kind, _dense_polyline(mni_path, 1.5), r, dep))

    for path in _trace_cortical_veins(tpl, rng, int(rng.integers(*MIMICS["cortical_veins"]))):
        add_path("vein", path, rng.uniform(*MIMICS["cortical_vein_radius"]))
    for path in _trace_medullary_veins(tpl, rng, int(rng.integers(*MIMICS["medullary_veins"]))):
        add_path("vein", path, rng.uniform(*MIMICS["medullary_vein_radius"]), 0.8 * depth)
    for _name, bilateral, radius, pts in _DEEP_VEINS:
        base = np.asarray(pts, dtype=np.float64)
        for sign in ((1.0, -1.0) if bilateral else (1.0,)):
            p = base * np.array([sign, 1.0, 1.0]) + rng.normal(0, 0.8, base.shape)
            add_path("vein", _smooth_path(_dense_polyline(p, 2.0), 2),
                     radius * rng.uniform(0.85, 1.15))
    if len(tpl.sss) > 3:
        add_path("vein", _smooth_path(tpl.sss + rng.normal(0, 0.5, tpl.sss.shape), 2),
                 rng.uniform(2.5, 3.5))

    if pending:  # one batched template -> world mapping for all paths
        world = geo.template_to_world(np.concatenate([p[1] for p in pending]))
        ends = np.cumsum([len(p[1]) for p in pending])
        for (kind, _coarse, r, dep), wc in zip(pending, np.split(world, ends[:-1]),
                                                strict=True):
            w = _dense_polyline(wc, step)  # the mapping is smooth: densify in world space
            taper = np.ones(len(w))
            if kind == "vein" and len(w) > 4:
                taper = np.clip(np.linspace(0.7, 1.3, len(w)), 0.7, 1.0)
            tubes.append(Tube(kind=kind, points=w, radius=r * taper, depth=dep))

    calcs: list[Lesion] = []
    p_calc = MIMICS["p_calcification"] * (0.6 + 0.012 * max(age - 40, 0))
    if rng.random() < p_calc:
        r = rng.uniform(*MIMICS["calcification_radius"])
        for sign in (1.0, -1.0):
            c = np.array([sign * 19.0, -4.0, -1.0]) + rng.normal(0, 1.0, 3)
            w = geo.template_to_world(c)[0]
            semi = r * rng.uniform(0.7, 1.2, 3)
            calcs.append(Lesion(0, "basal_ganglia", 2 * float(np.cbrt(semi.prod())), w, semi,
                                _random_rotation(rng)))

    blobs: list[Blob] = []
    if rng.random() < MIMICS["p_artefact_frontal"]:
        c = np.array([0.0, 70.0, -20.0]) + rng.normal(0, [3.0, 2.0, 2.0])
        blobs.append(Blob(geo.template_to_world(c)[0], rng.uniform([8, 6, 5], [13, 9, 7]),
                          rng.uniform(0.6, 0.95)))
    if rng.random() < MIMICS["p_artefact_temporal"]:
        sides = (1.0, -1.0) if rng.random() < 0.7 else (rng.choice([1.0, -1.0]),)
        for sign in sides:
            c = np.array([sign * 50.0, -26.0, -38.0]) + rng.normal(0, 2.5, 3)
            blobs.append(Blob(geo.template_to_world(c)[0], rng.uniform([6, 8, 5], [10, 13, 8]),
                              rng.uniform(0.5, 0.9)))

    if siderosis_lobe is not None:
        codes = tpl.pial_lobe
        # on the convexity (seen as curvilinear lines following the gyri on axial slices)
        cand = np.flatnonzero((codes == _SUB_CODE[siderosis_lobe]) & (tpl.pial_pts[:, 2] > -5)
                              & (tpl.lookup(tpl.dist_in, tpl.pial_pts) <= 4))
        if len(cand) == 0:
            cand = np.arange(len(codes))
        centre = tpl.pial_pts[cand[rng.integers(0, len(cand))]]
        radius = rng.uniform(*MIMICS["siderosis_radius_mm"])
        near = np.flatnonzero(np.linalg.norm(tpl.pial_pts - centre, axis=1) < radius)
        pts = tpl.pial_pts[near].astype(np.float64)
        if len(pts) > 12000:  # regular thinning keeps the layer continuous
            pts = pts[:: int(math.ceil(len(pts) / 12000))]
        w = geo.template_to_world(pts)
        tubes.append(Tube(kind="siderosis", points=w,
                          radius=np.full(len(w), rng.uniform(0.8, 1.1)),
                          depth=MIMICS["siderosis_depth"]))
    return tubes, calcs, blobs


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _sample_diameter(rng: np.random.Generator) -> float:
    s = LESION_SIZE
    while True:
        d = s["median_mm"] * math.exp(rng.normal(0, s["sigma"]))
        if s["min_mm"] <= d <= s["max_mm"]:
            return float(d)


def _lesion_count(rng: np.random.Generator, dist: ClassDistribution) -> int:
    u = rng.random()
    if u < dist.p_zero:
        return 0
    if u < dist.p_zero + dist.p_one:
        return 1
    n = 2 + _neg_binomial(rng, dist.count_mean, dist.count_dispersion)
    return int(min(n, dist.count_max))


def _region_sequence(rng: np.random.Generator, dist: ClassDistribution, pattern: str,
                     n: int) -> list[str]:
    weights = dist.subregion_weights[pattern]
    subs = [_choose(rng, weights) for _ in range(n)]
    if pattern == "mixed" and n >= 2:
        groups = {SUBREGIONS[s] for s in subs}
        if "lobar" not in groups:
            lob = {k: v for k, v in weights.items() if SUBREGIONS[k] == "lobar"}
            subs[int(rng.integers(n))] = _choose(rng, lob)
        if groups <= {"lobar"} or {SUBREGIONS[s] for s in subs} <= {"lobar"}:
            deep = {k: v for k, v in weights.items() if SUBREGIONS[k] != "lobar"}
            lobar_idx = [i for i, s in enumerate(subs) if SUBREGIONS[s] == "lobar"]
            subs[lobar_idx[int(rng.integers(len(lobar_idx)))]] = _choose(rng, deep)
    return subs


def _min_dist_to_points(p: np.ndarray, tree: cKDTree | None, radii: np.ndarray,
                        reach: float) -> float:
    """Smallest (distance - radius) from ``p`` to a set of points with radii."""
    if tree is None:
        return float("inf")
    idx = tree.query_ball_point(p, r=reach)
    if not idx:
        return float("inf")
    pts = tree.data[idx]
    return float(np.min(np.linalg.norm(pts - p, axis=1) - radii[idx]))


def plan_patient(spec: PatientSpec, profile: CenterProfile,
                 template: Template | None = None) -> PatientPlan:
    """Sample age, pose, CMBs (count, subregion, size, position) and mimics.

    Cheap (no volume is rendered); :func:`render_patient` turns a plan into volumes.
    """
    tpl = template or get_template()
    rng = np.random.default_rng(spec.seed)
    dist = CLASS_DISTRIBUTIONS[spec.label]
    age = float(np.clip(rng.normal(dist.age_mean, dist.age_sd), dist.age_min, dist.age_max))
    pattern = _choose(rng, dist.patterns)
    n_target = _lesion_count(rng, dist)
    subs = _region_sequence(rng, dist, pattern, n_target)
    siderosis_lobe = None
    if rng.random() < dist.p_siderosis.get(pattern, 0.0):
        siderosis_lobe = _choose(rng, _LOBAR_POSTERIOR)
    geo = _make_geometry(profile, rng)
    tubes, calcs, blobs = _plan_mimics(tpl, geo, rng, profile, age, siderosis_lobe)

    # exclusion structures (world mm)
    tube_pts = np.concatenate([t.points for t in tubes]) if tubes else np.zeros((0, 3))
    tube_r = np.concatenate([t.radius for t in tubes]) if tubes else np.zeros(0)
    tube_tree = cKDTree(tube_pts) if len(tube_pts) else None
    margin = float(max(geo.spacing)) + 0.75
    vox_margin = np.ceil(12.0 / geo.spacing).astype(int)

    lesions: list[Lesion] = []
    placed_c: list[np.ndarray] = []
    placed_r: list[float] = []
    inv_aff = np.linalg.inv(geo.affine)
    for sub in subs:
        diameter = _sample_diameter(rng)
        r_eq = diameter / 2
        elong = rng.uniform(1.0, LESION_SIZE["elongation_max"])
        semi = r_eq * np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)])
        rmax = float(semi.max())
        cand = tpl.candidates[sub]
        ok = False
        for _round in range(4):
            flat = cand[rng.integers(0, len(cand), 16)]
            ijk = np.stack(np.unravel_index(flat, tpl.shape), axis=1).astype(np.float64)
            ijk += rng.uniform(-0.5, 0.5, ijk.shape)
            mni = ijk @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
            deep_enough = tpl.lookup(tpl.dist_in, mni) >= rmax * 1.1 + 1.5
            if not deep_enough.any():
                continue
            mni = mni[deep_enough]
            world = geo.template_to_world(mni)
            vox = world @ inv_aff[:3, :3].T + inv_aff[:3, 3]
            in_fov = np.all((vox >= vox_margin) & (vox <= np.array(geo.shape) - 1 - vox_margin),
                            axis=1)
            for w in world[in_fov]:
                if _min_dist_to_points(w, tube_tree, tube_r, rmax + margin + 4.0) \
                        < rmax + margin:
                    continue
                if any(np.linalg.norm(w - c.centre) < rmax + c.radius_max + margin + 1.0
                       for c in calcs):
                    continue
                if any(b.attenuation(w) > 0.005 for b in blobs):
                    continue
                if any(np.linalg.norm(w - c) < rmax + r + margin + 0.5
                       for c, r in zip(placed_c, placed_r, strict=True)):
                    continue
                ok = True
                break
            if ok:
                break
        if not ok:
            logger.debug("%s: no room for a %s lesion; skipped", spec.patient_id, sub)
            continue
        lesions.append(Lesion(len(lesions) + 1, sub, float(diameter), w, semi,
                              _random_rotation(rng)))
        placed_c.append(w)
        placed_r.append(rmax)
    if len(lesions) < n_target:
        logger.info("%s: placed %d of %d CMBs", spec.patient_id, len(lesions), n_target)
    return PatientPlan(spec=spec, profile=profile, age=round(age, 1), pattern=pattern,
                       geometry=geo, lesions=lesions, tubes=tubes, calcifications=calcs,
                       artefacts=blobs, siderosis=siderosis_lobe is not None,
                       gamma=float(rng.uniform(0.9, 1.1)), gain=float(rng.uniform(0.9, 1.1)),
                       n_requested=n_target)


def _pattern_of(lesions: Sequence[Lesion]) -> str:
    groups = {les.region for les in lesions}
    if not groups:
        return "none"
    if groups == {"lobar"}:
        return "strictly_lobar"
    if "lobar" in groups:
        return "mixed"
    return "deep_infratentorial"


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
@dataclass
class RenderedPatient:
    """Volumes of one patient on the centre grid (all share ``affine``)."""

    plan: PatientPlan
    affine: np.ndarray
    swi: np.ndarray  # float32
    cmb_mask: np.ndarray  # int16 instance ids
    brain_mask: np.ndarray  # uint8
    mimic_mask: np.ndarray  # uint8 MIMIC_CODES
    lesion_voxels: dict[int, int]


def _ellipsoid_coverage(les: Lesion, geo: Geometry, pad_mm: float) -> tuple[
        tuple[slice, ...], np.ndarray, np.ndarray]:
    """Partial-volume coverage and out-of-lesion distance in a local box.

    Returns (box slices, coverage [0, 1], distance in mm from the ellipsoid surface
    at voxel centres, 0 inside).
    """
    sp = geo.spacing
    vc = geo.world_to_vox(les.centre[None])[0]
    ext = (les.radius_max + pad_mm) / sp
    lo = np.maximum(np.floor(vc - ext).astype(int), 0)
    hi = np.minimum(np.ceil(vc + ext).astype(int) + 1, np.array(geo.shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    if np.any(hi <= lo):
        return box, np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.float32)
    # world->ellipsoid frame: e = diag(1/semi) R^T (w - c); w = A v
    lin = np.diag(1.0 / les.semi_axes) @ les.rotation.T @ geo.affine[:3, :3]
    off = lin @ (lo - vc)  # at box origin relative to lesion centre (voxel units)
    nsub = np.clip(np.ceil(sp / 0.4).astype(int), 2, 8)
    subs = [(np.arange(n) + 0.5) / n - 0.5 for n in nsub]
    shape = tuple(hi - lo)
    gi = [np.arange(n, dtype=np.float64) for n in shape]
    sub_pts = np.stack(np.meshgrid(*subs, indexing="ij"), -1).reshape(-1, 3)
    centres = np.stack(np.meshgrid(*gi, indexing="ij"), -1).reshape(-1, 3)
    e_c = centres @ lin.T + off  # ellipsoid coords of voxel centres
    e_sub = sub_pts @ lin.T
    inside = (((e_c[:, None, :] + e_sub[None, :, :]) ** 2).sum(-1) <= 1.0).mean(1)
    rho = np.sqrt((e_c ** 2).sum(-1))
    # approximate metric distance outside: (rho - 1) * local radius along that direction
    dist = np.maximum(rho - 1.0, 0.0) * (les.radius_max + float(les.semi_axes.min())) / 2
    return box, inside.reshape(shape).astype(np.float32), dist.reshape(shape).astype(
        np.float32)


def _splat_tubes(tubes: Sequence[Tube], geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Max coverage of tube-like mimics: (vein coverage, siderosis coverage) arrays."""
    shape = geo.shape
    out = {"vein": np.zeros(shape, np.float32), "siderosis": np.zeros(shape, np.float32)}
    inv = np.linalg.inv(geo.affine)
    lin = geo.affine[:3, :3]
    soft = float(np.mean(geo.spacing)) * 0.5
    nvox = int(np.prod(shape))
    for kind in out:
        sel = [t for t in tubes if t.kind == kind]
        if not sel:
            continue
        for rgroup in _radius_groups(sel):
            pts = np.concatenate([t.points[m] for t, m in rgroup])
            rad = np.concatenate([t.radius[m] for t, m in rgroup])
            dep = np.concatenate([np.full(int(m.sum()), t.depth) for t, m in rgroup])
            rmax = float(rad.max())
            v = pts @ inv[:3, :3].T + inv[:3, 3]
            ext = np.ceil((rmax + soft) / geo.spacing).astype(int)
            offs = np.stack(np.meshgrid(*[np.arange(-e, e + 1) for e in ext], indexing="ij"),
                            -1).reshape(-1, 3)
            base = np.rint(v).astype(np.int64)
            for chunk in range(0, len(base), 4000):
                b = base[chunk: chunk + 4000]
                nb = b[:, None, :] + offs[None, :, :]
                delta = (nb - v[chunk: chunk + 4000, None, :]) @ lin.T
                dmm = np.sqrt((delta ** 2).sum(-1))
                cov = np.clip((rad[chunk: chunk + 4000, None] - dmm) / (2 * soft) + 0.5, 0, 1)
                cov *= dep[chunk: chunk + 4000, None]
                ok = np.all((nb >= 0) & (nb < np.array(shape)), axis=-1) & (cov > 0)
                flat = np.ravel_multi_index(tuple(nb[ok].T), shape)
                np.maximum.at(out[kind].reshape(nvox), flat, cov[ok].astype(np.float32))
    return out["vein"], out["siderosis"]


def _radius_groups(tubes: Sequence[Tube]) -> list[list[tuple[Tube, np.ndarray]]]:
    """Group tube points by radius (small neighbourhoods for thin vessels)."""
    edges = [0.0, 1.2, 2.2, 100.0]
    groups = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        g = [(t, (t.radius >= lo) & (t.radius < hi)) for t in tubes]
        g = [(t, m) for t, m in g if m.any()]
        if g:
            groups.append(g)
    return groups


def render_patient(plan: PatientPlan, template: Template | None = None) -> RenderedPatient:
    """Render a :class:`PatientPlan` into SWI, CMB mask, brain mask and mimic mask."""
    tpl = template or get_template()
    prof, geo = plan.profile, plan.geometry
    rng = np.random.default_rng(_child_seed(plan.spec.seed, 1))
    base, age_term = tpl.base_intensity(prof)
    age_factor = np.float32(0.4 + 0.025 * (plan.age - 40.0))
    intensity_t = base - age_factor * age_term if age_factor > 0 else base
    coords = geo.template_voxel_coords(tpl)
    img = ndi.map_coordinates(intensity_t, coords, order=1, cval=0.0, prefilter=False)
    brain_p = ndi.map_coordinates(tpl.brain, coords, order=1, cval=0.0, prefilter=False)
    del coords
    brain = brain_p >= 0.5
    np.maximum(img, 0, out=img)
    if plan.gamma != 1.0:
        np.power(img, np.float32(plan.gamma), out=img)

    mimic = np.zeros(geo.shape, np.uint8)
    vein, sider = _splat_tubes(plan.tubes, geo)
    img *= 1 - vein
    img *= 1 - sider
    mimic[vein >= 0.25] = MIMIC_CODES["vein"]
    mimic[sider >= 0.25] = MIMIC_CODES["siderosis"]
    del vein, sider

    for calc in plan.calcifications:
        box, cov, _ = _ellipsoid_coverage(calc, geo, 1.0)
        if cov.size:
            img[box] *= 1 - MIMICS["calcification_depth"] * cov
            mimic[box][cov >= 0.4] = MIMIC_CODES["calcification"]

    for blob in plan.artefacts:
        ext = np.ceil(3.2 * blob.sigma.max() / geo.spacing).astype(int)
        vc = np.rint(geo.world_to_vox(blob.centre[None])[0]).astype(int)
        lo = np.maximum(vc - ext, 0)
        hi = np.minimum(vc + ext + 1, np.array(geo.shape))
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)],
                                   indexing="ij"), -1)
        w = idx @ geo.affine[:3, :3].T + geo.affine[:3, 3]
        att = blob.attenuation(w).astype(np.float32)
        # dropout plus a faint bright pile-up ring just outside it
        ring = 0.25 * blob.depth * np.exp(-0.5 * ((np.sqrt(-2 * np.log(np.maximum(
            att / blob.depth, 1e-9))) - 2.2) / 0.4) ** 2)
        img[box] *= (1 - att) * (1 + ring.astype(np.float32))
        mimic[box][att >= 0.3] = MIMIC_CODES["artefact"]

    cmb = np.zeros(geo.shape, np.int16)
    counts: dict[int, int] = {}
    bloom = prof.blooming
    for les in plan.lesions:
        sigma = LESION_SIZE["halo_sigma_mm"] * bloom + 0.3 * les.radius_max * bloom
        box, cov, dist = _ellipsoid_coverage(les, geo, 3.0 * sigma + 1.0)
        if not cov.size:
            continue
        core = LESION_SIZE["core_depth"] * rng.uniform(0.9, 1.0)
        halo = LESION_SIZE["halo_depth"] * min(bloom, 1.3) * np.exp(-0.5 * (dist / max(
            sigma, 1e-3)) ** 2) * (cov < 1)
        att = np.maximum(core * cov, halo)
        img[box] *= (1 - att).astype(np.float32)
        m = cov >= 0.5
        if not m.any():
            m = cov >= cov.max() - 1e-6
        sub = cmb[box]
        sub[m] = les.lesion_id
        counts[les.lesion_id] = int(m.sum())

    img *= geo.bias_field()
    scale = np.float32(prof.intensity_scale * plan.gain)
    img *= scale
    sigma_n = np.float32(prof.intensity_scale / prof.snr)
    n1 = rng.standard_normal(geo.shape, dtype=np.float32)
    n1 *= sigma_n
    img += n1
    np.square(img, out=img)
    rng.standard_normal(geo.shape, dtype=np.float32, out=n1)
    n1 *= sigma_n
    np.square(n1, out=n1)
    img += n1
    np.sqrt(img, out=img)
    # keep 12 significant bits (relative precision 2.4e-4, far below the noise): the
    # volume compresses ~35 % smaller and faster, and stays float32
    img.view(np.uint32)[...] &= np.uint32(0xFFFFF000)
    return RenderedPatient(plan=plan, affine=geo.affine.copy(), swi=img, cmb_mask=cmb,
                           brain_mask=brain.astype(np.uint8), mimic_mask=mimic,
                           lesion_voxels=counts)


# --------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------
def cohort_specs(patients_per_class: int, centers: Sequence[CenterProfile | str],
                 seed: int = 0) -> list[PatientSpec]:
    """Balanced patient list: each class spread evenly over the centres.

    Ids are ``<centre>_<nnn>`` in a shuffled order (the id does not reveal the class);
    each patient gets ``SeedSequence(seed).spawn(...)[i]``.
    """
    names = [c.name if isinstance(c, CenterProfile) else str(c) for c in centers]
    if patients_per_class < 0:
        raise ValueError("patients_per_class must be >= 0")
    if not names:
        raise ValueError("at least one centre is needed")
    order_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    per_centre: dict[str, list[str]] = {n: [] for n in names}
    for ci, label in enumerate(CLASSES):
        for k in range(patients_per_class):
            per_centre[names[(k + ci) % len(names)]].append(label)
    rows: list[tuple[str, str, str]] = []
    for n in names:
        labels = per_centre[n]
        perm = order_rng.permutation(len(labels))
        for i, li in enumerate(perm):
            rows.append((f"{n}_{i + 1:03d}", n, labels[li]))
    seeds = np.random.SeedSequence(seed).spawn(len(rows))
    return [PatientSpec(pid, c, lab, s) for (pid, c, lab), s in zip(rows, seeds, strict=True)]


def _atomic_save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if arr.dtype.kind in "iu":
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_output(path, ".nii.gz") as tmp:
        nib.save(img, tmp)


_MANIFEST_COLUMNS = ["patient_id", "center", "label", "swi", "cmb_mask", "age", "brain_mask",
                     "mimic_mask", "role", "n_cmb", "pattern", "siderosis", "calcification",
                     "artefact"]
_LESION_COLUMNS = ["patient_id", "lesion_id", "region", "subregion", "diameter_mm", "x_mm",
                   "y_mm", "z_mm", "n_voxels"]


def generate_patient(spec: PatientSpec, profile: CenterProfile, out_dir: str | os.PathLike,
                     template: Template | None = None) -> tuple[dict[str, Any],
                                                                list[dict[str, Any]]]:
    """Plan, render and write one patient; return its manifest row and lesion rows."""
    out_dir = Path(out_dir)
    plan = plan_patient(spec, profile, template)
    rend = render_patient(plan, template)
    pdir = out_dir / spec.patient_id
    pdir.mkdir(parents=True, exist_ok=True)
    files = {"swi": (rend.swi, "swi.nii.gz"), "cmb_mask": (rend.cmb_mask, "cmb_mask.nii.gz"),
             "brain_mask": (rend.brain_mask, "brain_mask.nii.gz"),
             "mimic_mask": (rend.mimic_mask, "mimic_mask.nii.gz")}
    for arr, name in files.values():
        _atomic_save_nifti(arr, rend.affine, pdir / name)
    row = {
        "patient_id": spec.patient_id, "center": profile.name, "label": spec.label,
        **{k: f"{spec.patient_id}/{name}" for k, (_, name) in files.items()},
        "age": plan.age, "role": profile.role, "n_cmb": plan.n_cmb,
        "pattern": _pattern_of(plan.lesions), "siderosis": int(plan.siderosis),
        "calcification": int(bool(plan.calcifications)), "artefact": int(bool(plan.artefacts)),
    }
    lesions = [{
        "patient_id": spec.patient_id, "lesion_id": les.lesion_id, "region": les.region,
        "subregion": les.subregion, "diameter_mm": round(les.diameter_mm, 3),
        "x_mm": round(float(les.centre[0]), 3), "y_mm": round(float(les.centre[1]), 3),
        "z_mm": round(float(les.centre[2]), 3),
        "n_voxels": rend.lesion_voxels.get(les.lesion_id, 0),
    } for les in plan.lesions]
    return row, lesions


_WORKER_PROFILES: dict[str, CenterProfile] = {}
_WORKER_OUT: Path | None = None


def _worker_init(profiles: dict[str, CenterProfile], out_dir: str) -> None:
    global _WORKER_OUT
    _WORKER_PROFILES.clear()
    _WORKER_PROFILES.update(profiles)
    _WORKER_OUT = Path(out_dir)
    logging.getLogger(__name__).setLevel(logger.getEffectiveLevel())


def _worker_run(spec: PatientSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    assert _WORKER_OUT is not None
    return generate_patient(spec, _WORKER_PROFILES[spec.center], _WORKER_OUT)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: r.get(k, "") for k in columns})
    write_text_atomic(path, buf.getvalue())


def generate_cohort(
    out_dir: str | os.PathLike,
    patients_per_class: int = 10,
    centers: Sequence[CenterProfile | str] = ("A", "B", "C"),
    seed: int = 0,
    workers: int = 1,
    progress: bool | Callable[[Iterable], Iterable] = False,
    preview: bool = False,
) -> Path:
    """Generate a synthetic cohort into ``out_dir``; return the manifest path.

    Writes ``manifest.csv``, ``lesions_gt.csv``, ``cohort.json`` (profiles, seed and
    the distribution table) and one folder per patient (docs/CONTRACTS.md). Centres
    are built-in names or :class:`CenterProfile` objects. Output is deterministic for
    a given seed (independent of ``workers``). ``progress`` True shows a tqdm bar.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profiles = [c if isinstance(c, CenterProfile) else resolve_centers([c])[0] for c in centers]
    by_name = {p.name: p for p in profiles}
    if len(by_name) != len(profiles):
        raise ValueError("centre names must be unique")
    specs = cohort_specs(patients_per_class, profiles, seed)
    tpl = get_template()
    for p in profiles:  # build caches before forking so workers share them
        tpl.base_intensity(p)
    logger.info("generating %d patients over centres %s into %s", len(specs),
                ",".join(by_name), out)

    def wrap(it: Iterable) -> Iterable:
        if callable(progress):
            return progress(it)
        if progress:
            from tqdm import tqdm

            return tqdm(it, total=len(specs), desc="synthetic cohort", unit="patient")
        return it

    results: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if workers <= 1 or len(specs) <= 1:
        _worker_init(by_name, str(out))
        for r in wrap(map(_worker_run, specs)):
            results.append(r)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                                 initializer=_worker_init,
                                 initargs=(by_name, str(out))) as ex:
            for r in wrap(ex.map(_worker_run, specs, chunksize=1)):
                results.append(r)

    rows = [r for r, _ in results]
    lesion_rows = [les for _, ls in results for les in ls]
    _write_csv(out / "lesions_gt.csv", _LESION_COLUMNS, lesion_rows)
    meta = {
        "generator": "detection.data.synthetic", "seed": seed,
        "patients_per_class": patients_per_class,
        "centers": [p.to_dict() for p in profiles],
        "class_distributions": {k: dataclasses.asdict(v)
                                for k, v in CLASS_DISTRIBUTIONS.items()},
        "lesion_size": LESION_SIZE, "mimics": MIMICS, "mimic_codes": MIMIC_CODES,
    }
    write_json_atomic(out / "cohort.json", meta)
    manifest = out / "manifest.csv"
    _write_csv(manifest, _MANIFEST_COLUMNS, rows)
    if preview:
        write_preview(manifest)
    return manifest


# --------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------
def write_preview(manifest: str | os.PathLike, out_png: str | os.PathLike | None = None,
                  n_patients: int = 6, n_slices: int = 5) -> Path:
    """PNG montage: axial slices of a few patients with CMB outlines (red) and mimic
    outlines (cyan: veins, yellow: calcification/artefact, orange: siderosis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    manifest = Path(manifest)
    root = manifest.parent
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # round-robin over classes, a new centre each time, preferring patients with CMBs
    ranked = sorted(rows, key=lambda r: (-int(r.get("n_cmb") or 0), r["patient_id"]))
    chosen: list[dict[str, str]] = []
    used: set[tuple[str, str]] = set()
    labels = sorted({r["label"] for r in rows})
    while len(chosen) < min(n_patients, len(rows)):
        before = len(chosen)
        for lab in labels:
            if len(chosen) >= n_patients:
                break
            pool = [r for r in ranked if r["label"] == lab and r not in chosen]
            fresh = [r for r in pool if (lab, r["center"]) not in used]
            pick = (fresh or pool)[:1]
            for r in pick:
                chosen.append(r)
                used.add((lab, r["center"]))
        if len(chosen) == before:
            break
    chosen.sort(key=lambda r: (r["label"], r["center"]))
    fig = Figure(figsize=(2.4 * n_slices, 2.6 * len(chosen)), dpi=90, facecolor="black")
    FigureCanvasAgg(fig)
    for row_i, r in enumerate(chosen):
        swi = np.asarray(nib.load(str(root / r["swi"])).dataobj, dtype=np.float32)
        cmb = np.asarray(nib.load(str(root / r["cmb_mask"])).dataobj)
        mim = None
        if r.get("mimic_mask"):
            mp_path = root / r["mimic_mask"]
            if mp_path.exists():
                mim = np.asarray(nib.load(str(mp_path)).dataobj)
        nz = swi.shape[2]
        with_cmb = np.flatnonzero((cmb > 0).any(axis=(0, 1)))
        levels = list(np.linspace(0.25, 0.8, n_slices) * (nz - 1))
        if len(with_cmb):
            pick = with_cmb[np.linspace(0, len(with_cmb) - 1, min(len(with_cmb), 3)).astype(int)]
            levels = sorted(set(int(k) for k in pick) | set(int(v) for v in levels))
            levels = [levels[i] for i in np.linspace(0, len(levels) - 1, n_slices).astype(int)]
        vmax = float(np.percentile(swi, 99.5))
        for col, k in enumerate(int(v) for v in levels):
            ax = fig.add_subplot(len(chosen), n_slices, row_i * n_slices + col + 1)
            ax.imshow(swi[:, :, k].T, origin="lower", cmap="gray", vmin=0, vmax=vmax,
                      interpolation="nearest")
            if (cmb[:, :, k] > 0).any():
                ax.contour((cmb[:, :, k] > 0).T.astype(float), levels=[0.5], colors="red",
                           linewidths=0.8)
            if mim is not None:
                for code, colour in ((1, "cyan"), (2, "yellow"), (3, "yellow"), (4, "orange")):
                    sl = (mim[:, :, k] == code)
                    if sl.any():
                        ax.contour(sl.T.astype(float), levels=[0.5], colors=colour,
                                   linewidths=0.3, alpha=0.6)
            ax.set_axis_off()
            ax.set_title(f"{r['patient_id']} {r['label']} z={k}" if col == 0 else f"z={k}",
                         color="white", fontsize=7)
    fig.suptitle("synthetic SWI (red: CMB mask; cyan: veins; yellow: calcification/artefact;"
                 " orange: siderosis)", color="white", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else root / "preview.png"
    with atomic_output(out_png, ".png") as tmp:
        fig.savefig(tmp, facecolor="black")
    logger.info("preview written to %s", out_png)
    return out_png
