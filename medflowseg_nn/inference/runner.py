"""Folder prediction: find the cases, check them, skip the finished ones, predict, export, report.

Sharding (``-num_parts P -part_id I``, nnU-Net's flags): part I takes every P-th case of the sorted case list,
so the parts are disjoint, cover the folder and are the same on every rerun; each part skips what is written.

:func:`predict_folder` is what ``mfs_predict`` runs. Every failure is isolated to its case and reported as one
line naming the file (``{case: problem}``), while all other cases are written. Preprocessing runs in nnU-Net's
background workers (falling back to this process if they die); exports run in a spawn pool; a worker that dies
(out of memory) fails only its case.

May be imported by the CLIs and the benchmarks.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import save_json

from medflowseg_nn import nnunet_compat
from medflowseg_nn.errors import UserError, one_line
from medflowseg_nn.inference.cascade import append_previous_stage, missing_previous_stage, previous_stage_files
from medflowseg_nn.inference.export import case_arrays, remove_empty_partial_dirs, write_case
from medflowseg_nn.inference.predictor import MedFlowSegPredictor

logger = logging.getLogger(__name__)
#: ``--save_uncertainty`` without a folder writes the maps here, inside the output folder
UNCERTAINTY_SUBFOLDER = "uncertainty"


@dataclass(frozen=True)
class ExportOptions:
    """What is written besides the segmentation (folders ``None`` = not written)."""

    save_probabilities: bool = False
    uncertainty_folder: Optional[str] = None
    overlay_folder: Optional[str] = None


@dataclass(frozen=True)
class CaseJob:
    case: str
    files: tuple[str, ...]
    output_truncated: str  # output folder / case id; nnU-Net appends the file ending
    prev_stage: Optional[str] = None  # cascade: the previous stage's segmentation of the case


@dataclass(frozen=True)
class PredictionSettings:
    """Everything ``mfs_predict`` passes down besides the folders (flag names in brackets)."""

    folds: Optional[tuple[Union[int, str], ...]] = None  # -f; None = all found
    checkpoint: str = "checkpoint_final.pth"  # -chk
    step_size: float = 0.5  # -step_size
    disable_tta: bool = False  # --disable_tta
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # -device
    steps: Optional[int] = None  # --steps
    solver: Optional[str] = None  # --solver
    seed: Optional[int] = None  # --seed
    num_samples: int = 1  # --num_samples
    hypotheses: str = "mean"  # --hypotheses
    path_mean: Optional[bool] = None  # --path_mean (None: the plans' flow_matching.path_mean)
    model_samples: bool = False  # --mc_dropout
    use_temperature: bool = True  # not --no_temperature
    overwrite: bool = False  # --overwrite
    num_processes_preprocessing: int = 2  # -npp
    num_processes_export: int = 2  # -nps
    verbose: bool = False  # --verbose
    num_parts: int = 1  # -num_parts: split the folder's cases into this many disjoint parts ...
    part_id: int = 0  # -part_id: ... and predict this one (0-based), as nnU-Net does

    def __post_init__(self) -> None:
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise UserError(f"-part_id must be in 0 .. {self.num_parts - 1} for -num_parts {self.num_parts}, got "
                            f"{self.part_id}")


def save_json_atomic(content: dict, path: str) -> None:
    """``save_json`` to a temporary file, then rename: parallel parts writing the same file never tear it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    save_json(content, tmp, sort_keys=False)
    os.replace(tmp, path)


def case_outputs(job: CaseJob, file_ending: str, options: ExportOptions) -> dict[str, str]:
    """Final output paths of a case by kind; the segmentation ("seg") is always last."""
    out = {}
    if options.uncertainty_folder:
        for kind in ("entropy", "disagreement"):
            out[kind] = os.path.join(options.uncertainty_folder, f"{job.case}_{kind}.nii.gz")
    if options.overlay_folder:
        out["png"] = os.path.join(options.overlay_folder, f"{job.case}.png")
    if options.save_probabilities:
        out.update(npz=job.output_truncated + ".npz", pkl=job.output_truncated + ".pkl")
    out["seg"] = job.output_truncated + file_ending
    return out


def export_case(logits, properties: dict, disagreement, job: CaseJob, options: ExportOptions, plans_manager,
                configuration_manager, dataset_json: dict, mapped=None) -> None:
    """Revert a case to the input geometry and write its outputs atomically (top level: runs in a spawn pool).
    ``mapped``: :attr:`CasePrediction.mapped` (probabilities and entropy from it)."""
    arrays = case_arrays(logits, properties, plans_manager, configuration_manager,
                         plans_manager.get_label_manager(dataset_json), disagreement=disagreement,
                         with_probabilities=options.save_probabilities,
                         with_entropy=options.uncertainty_folder is not None, mapped=mapped)
    io = plans_manager.image_reader_writer_class()

    def overlay(path: str, a) -> None:
        from medflowseg_nn.inference.overlay import save_overlay_png

        names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
        save_overlay_png(path, io.read_images(job.files)[0][0], a.segmentation, a.entropy, properties["spacing"],
                         names, job.case)

    write_case(arrays, case_outputs(job, dataset_json["file_ending"], options), properties, io.write_seg, overlay)


def list_cases(input_folder: str, file_ending: str) -> dict[str, list[str]]:
    """``{case: [channel files]}`` of ``input_folder`` (nnU-Net naming ``CASE_XXXX{file_ending}``)."""
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    if not os.path.isdir(input_folder):
        raise UserError(f"input folder {input_folder} does not exist")
    files = sorted(f for f in os.listdir(input_folder) if f.endswith(file_ending) and not f.startswith("."))
    cases = {str(c): create_paths_fn(input_folder, files, file_ending, str(c))
             for c in get_identifiers_from_splitted_dataset_folder(input_folder, file_ending)}
    cases = {c: f for c, f in cases.items() if f}
    if not cases:
        raise UserError(f"no images in {input_folder} match CASE_0000{file_ending} (nnU-Net naming: one file per "
                        f"channel with a _XXXX suffix, ending {file_ending})")
    return cases


def validate_case(case: str, files: Sequence[str], file_ending: str, num_channels: int) -> list[str]:
    """Problems (one line each, naming the file) that would make nnU-Net fail on this case; [] if it is usable.

    Readable and complete (SimpleITK silently reads truncated NIfTI: a NIfTI is judged from its header and size,
    :mod:`medflowseg_nn.nifti_integrity`, and decoded with nibabel only when that cannot vouch for it, so the
    voxels are not decompressed twice) and the channels add up to the model's ``num_channels`` (a 4D file counts
    its 4th axis). NaN/Inf in a complete NIfTI input is not looked for (planning's check does that)."""
    from medflowseg_nn.dataset_checks import NATURAL_IMAGE_ENDINGS, check_case

    natural = file_ending.lower() in NATURAL_IMAGE_ENDINGS
    problems, _ = check_case(case=case, image_paths=list(files), natural=natural, num_channels=num_channels,
                             read_voxels=False)
    if natural or problems:
        return problems
    import SimpleITK as sitk

    found = 0
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        reader.ReadImageInformation()
        found += reader.GetSize()[3] if reader.GetDimension() == 4 else 1
    if found != num_channels:
        names = ", ".join(os.path.basename(f) for f in files)
        expected = ", ".join(f"{case}_{c:04d}{file_ending}" for c in range(num_channels))
        problems.append(f"{names}: {found} channel(s) but the model expects {num_channels} ({expected}) — wrong "
                        "channel count; provide exactly the model's channel files")
    return problems


def preprocessed_cases(predictor: MedFlowSegPredictor, jobs: Sequence[CaseJob], num_processes: int,
                       failures: dict[str, str]) -> Iterator[tuple[CaseJob, dict]]:
    """Yield ``(job, {'data' [C, *S], 'data_properties'})``. nnU-Net's background preprocessing first; if it
    dies, the remaining cases are preprocessed here, one at a time, failures recorded per case."""
    remaining = {j.output_truncated: j for j in jobs}
    if num_processes > 0 and jobs:
        try:
            prev = [j.prev_stage for j in jobs] if any(j.prev_stage for j in jobs) else None
            for item in nnunet_compat.background_preprocessing(predictor, [list(j.files) for j in jobs],
                                                               list(remaining), num_processes, prev):
                yield remaining.pop(item["ofile"]), item
        except RuntimeError as e:
            logger.warning("background preprocessing failed (%s); preprocessing the remaining %d case(s) in this "
                           "process", e, len(remaining))
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=predictor.verbose_preprocessing)
    for job in list(remaining.values()):
        try:
            data, seg, props = preprocessor.run_case(list(job.files), job.prev_stage, predictor.plans_manager,
                                                     predictor.configuration_manager, predictor.dataset_json)
            if job.prev_stage is not None:
                data = append_previous_stage(data, seg, predictor.label_manager.foreground_labels)
        except Exception as e:  # noqa: BLE001 - reported per case
            failures[job.case] = f"{os.path.basename(job.files[0])}: preprocessing failed ({one_line(e)})"
            continue
        yield job, {"data": torch.from_numpy(data).float().contiguous(), "data_properties": props}


def predict_cases(predictor: MedFlowSegPredictor, jobs: Sequence[CaseJob], options: ExportOptions = ExportOptions(),
                  num_processes_preprocessing: int = 2, num_processes_export: int = 2) -> dict[str, str]:
    """Predict and export every job; returns ``{case: one-line problem}`` for the cases that failed (their
    outputs are not written; all others are). ``num_processes_* = 0`` runs that stage in this process."""
    with_disagreement = options.uncertainty_folder is not None
    wants_probs = options.save_probabilities or with_disagreement  # the uncertainty folder holds the entropy map
    failures: dict[str, str] = {}
    pool = multiprocessing.get_context("spawn").Pool(num_processes_export) if num_processes_export > 0 else None
    workers = nnunet_compat.pool_workers(pool) if pool is not None else []
    pending: list[tuple[CaseJob, multiprocessing.pool.AsyncResult]] = []
    try:
        for job, item in preprocessed_cases(predictor, jobs, num_processes_preprocessing, failures):
            logger.info("predicting %s", job.case)
            name = os.path.basename(job.files[0])
            try:
                out = predictor.predict_case(item["data"], with_disagreement=with_disagreement, with_mapped=wants_probs)
            except Exception as e:  # noqa: BLE001 - reported per case
                failures[job.case] = f"{name}: prediction failed ({one_line(e)})"
                continue
            args = (out.logits.numpy(), item["data_properties"],
                    None if out.disagreement is None else out.disagreement.numpy(), job, options,
                    predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json,
                    None if out.mapped is None else out.mapped.numpy())
            if pool is None:
                try:
                    export_case(*args)
                except Exception as e:  # noqa: BLE001
                    failures[job.case] = f"{name}: export failed ({one_line(e)})"
                continue
            while all(w.is_alive() for w in workers) and \
                    sum(not r.ready() for _, r in pending) >= num_processes_export + 2:
                time.sleep(0.05)
            pending.append((job, pool.apply_async(export_case, args)))
        for job, result in pending:
            while not result.ready() and all(w.is_alive() for w in workers):
                result.wait(0.1)
            try:
                if not result.ready():
                    raise RuntimeError("export worker died (out of memory?) — rerun with -nps 0 or fewer")
                result.get()
            except Exception as e:  # noqa: BLE001 - reported per case
                failures[job.case] = f"{os.path.basename(job.files[0])}: export failed ({one_line(e)})"
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return failures


def predict_folder(input_folder: str, output_folder: str, model_folder: str,
                   settings: PredictionSettings = PredictionSettings(),
                   options: ExportOptions = ExportOptions(),
                   prev_stage_predictions: Optional[str] = None) -> dict[str, str]:
    """Predict every case of ``input_folder`` into ``output_folder`` (nnU-Net file naming and geometry).

    A cascade stage (``3d_cascade_fullres``) needs ``prev_stage_predictions``: the folder of the previous stage's
    ``CASE<ending>`` segmentations (see :mod:`medflowseg_nn.inference.cascade`); a case without one fails alone.

    Cases whose outputs all exist are skipped unless ``settings.overwrite``. Returns ``{case: problem}`` for the
    cases that could not be predicted (invalid input or failure); every other case is written."""
    s = settings
    predictor = MedFlowSegPredictor(tile_step_size=s.step_size, use_gaussian=True, use_mirroring=not s.disable_tta,
                                    perform_everything_on_device=s.device.type == "cuda", device=s.device,
                                    verbose=s.verbose, allow_tqdm=True, steps=s.steps, solver=s.solver, seed=s.seed,
                                    num_samples=s.num_samples, use_temperature=s.use_temperature,
                                    hypotheses=s.hypotheses, model_samples=s.model_samples, path_mean=s.path_mean)
    predictor.initialize_from_trained_model_folder(model_folder, s.folds, s.checkpoint)
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if options.uncertainty_folder and s.num_samples < 2:
        logger.warning("--num_samples 1: the disagreement maps are all 0 (they need K >= 2 samples)")
    cases = sorted(list_cases(input_folder, ending).items())
    prev = previous_stage_files([c for c, _ in cases], prev_stage_predictions, ending,
                                predictor.configuration_manager)
    jobs = [CaseJob(c, tuple(f), os.path.join(output_folder, c), None if prev is None else prev[i])
            for i, (c, f) in enumerate(cases)][s.part_id::s.num_parts]
    todo = [j for j in jobs if s.overwrite or not all(map(os.path.isfile, case_outputs(j, ending, options).values()))]
    if len(todo) < len(jobs):
        logger.info("skipping %d case(s) whose outputs exist in %s (--overwrite redoes them)", len(jobs) - len(todo),
                    output_folder)
    with ThreadPoolExecutor(max(1, s.num_processes_preprocessing)) as pool:
        checks = list(pool.map(lambda j: validate_case(j.case, j.files, ending, num_channels)
                               + missing_previous_stage(j.case, j.prev_stage), todo))
    failures = {j.case: "; ".join(p) for j, p in zip(todo, checks) if p}
    todo = [j for j in todo if j.case not in failures]
    folders = [f for f in (output_folder, options.uncertainty_folder, options.overlay_folder) if f]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    for name, content in (("dataset.json", dataset_json), ("plans.json", predictor.plans_manager.plans)):
        save_json_atomic(content, os.path.join(output_folder, name))  # as nnU-Net does; parts may run at once
    logger.info("predicting %d case(s) from %s with %s, %d sample(s), seed %d", len(todo), input_folder,
                predictor.segmenter.solver, s.num_samples, predictor.segmenter.seed)
    if todo:
        failures.update(predict_cases(predictor, todo, options, s.num_processes_preprocessing,
                                      s.num_processes_export))
    remove_empty_partial_dirs(folders)
    return dict(sorted(failures.items()))
