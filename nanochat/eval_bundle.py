"""
The CORE eval bundle (nanochat/core_eval.py scores it): finding it (the local mirror, a previous download, or a
fresh download, checked and unpacked atomically), and reading it: the task list of core.yaml, each task's random
baseline from eval_meta_data.csv, and a task's items from eval_data/**.jsonl, checked against its task type.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat.common import get_base_dir, mirror_path
from nanochat.download import DownloadError, download_file
from tasks.common import MalformedDataError, read_jsonl

# The 22 tasks of CORE, in the order of the original bundle's core.yaml.
CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
TASK_TYPES = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"


# -----------------------------------------------------------------------------
# The eval bundle: the local mirror, a previous download, or a fresh download


def get_eval_bundle(url: str | None = None) -> Path:
    """Directory of the eval bundle: $NANOCHAT_DATA_DIR/eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle
    (downloaded from `url`, $NANOCHAT_EVAL_BUNDLE_URL or the original nanochat URL when absent)."""
    mirror = mirror_path("eval_bundle")
    if mirror is not None and (mirror / "core.yaml").exists():
        return mirror
    destination = get_base_dir() / "eval_bundle"
    if (destination / "core.yaml").exists():
        return destination
    return download_eval_bundle(url or os.environ.get(BUNDLE_URL_ENV) or DEFAULT_BUNDLE_URL, destination)


def _check_zip(path: Path) -> None:
    """Raise ValueError unless `path` is a whole zip: a truncated body or an HTML error page fails here."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except zipfile.BadZipFile as e:
        raise ValueError(f"the download is not a zip file ({e})") from e
    if corrupt is not None:
        raise ValueError(f"member {corrupt} of the zip fails its CRC check")


def _extract_safely(archive: zipfile.ZipFile, target: Path) -> None:
    for name in archive.namelist():
        if not (target / name).resolve().is_relative_to(target.resolve()):
            raise zipfile.BadZipFile(f"member {name!r} would extract outside the target directory")
    archive.extractall(target)


def download_eval_bundle(url: str, destination: Path, retries: int = 5, backoff_seconds: float = 2.0,
                         timeout: float = 60.0) -> Path:
    """Download the bundle zip from `url` (up to `retries` attempts in all) and unpack it as `destination`,
    atomically: the zip arrives whole and checked (nanochat/download.py), is unpacked into a temporary directory,
    and that is renamed into place."""
    destination = Path(destination)
    zip_path = destination.parent / f".eval_bundle.{os.getpid()}.zip"
    try:
        print(f"downloading the CORE eval bundle from {url}", flush=True)
        try:
            # `retries` here has always counted every attempt; download_file counts those after the first
            download_file(url, zip_path, retries=max(retries - 1, 0), backoff_seconds=backoff_seconds,
                          timeout=timeout, validate=_check_zip, progress=True)
        except DownloadError as e:
            raise RuntimeError(
                f"could not download the CORE eval bundle ({e}). Fix: point --bundle-url / ${BUNDLE_URL_ENV} at a "
                f"reachable copy of eval_bundle.zip, or unzip it yourself into {destination} (or into "
                "$NANOCHAT_DATA_DIR/eval_bundle)."
            ) from e
        unpack_dir = Path(tempfile.mkdtemp(prefix=".eval_bundle.", dir=destination.parent))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                _extract_safely(archive, unpack_dir)
            # the original zip holds an eval_bundle/ folder; accept the files at the top level as well
            roots = [unpack_dir, *sorted(p for p in unpack_dir.iterdir() if p.is_dir())]
            root = next((p for p in roots if (p / "core.yaml").exists()), None)
            if root is None:
                raise RuntimeError(f"the zip from {url} holds no core.yaml (top level or one folder down); is it "
                                   "the CORE eval bundle?")
            try:
                root.rename(destination)
            except OSError:
                if not (destination / "core.yaml").exists():  # else another process finished first: keep theirs
                    raise
        finally:
            shutil.rmtree(unpack_dir, ignore_errors=True)
    finally:
        zip_path.unlink(missing_ok=True)
    return destination


# -----------------------------------------------------------------------------
# Task configuration and data


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str  # relative to eval_data/
    task_type: str  # multiple_choice | schema | language_modeling
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # a fraction: the bundle's CSV gives percentages


def load_core_tasks(bundle_dir: Path) -> tuple[list[TaskSpec], dict[str, str]]:
    """The CORE tasks this bundle can evaluate, and {label: why not} for each of the 22 it cannot."""
    bundle_dir = Path(bundle_dir)
    config_path = bundle_dir / "core.yaml"
    for required in (config_path, bundle_dir / "eval_meta_data.csv"):
        if not required.exists():
            raise FileNotFoundError(f"the eval bundle at {bundle_dir} has no {required.name}; delete the folder so "
                                    "that base_eval downloads the bundle again, or point NANOCHAT_DATA_DIR at a "
                                    "mirror holding eval_bundle/")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list):
        raise MalformedDataError(f"{config_path}: expected a top-level 'icl_tasks:' list")
    baselines = load_random_baselines(bundle_dir / "eval_meta_data.csv")
    tasks, missing = [], {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"label", "dataset_uri", "icl_task_type"} <= entry.keys():
            raise MalformedDataError(f"{config_path}: icl_tasks[{position}] needs label, dataset_uri, icl_task_type")
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise MalformedDataError(f"{config_path}: task {label} has icl_task_type {task_type!r}; CORE knows "
                                     f"{list(TASK_TYPES)}")
        if label not in baselines:
            raise MalformedDataError(f"{bundle_dir / 'eval_meta_data.csv'}: no 'Random baseline' for task {label}")
        if not (bundle_dir / "eval_data" / entry["dataset_uri"]).exists():
            missing[label] = f"data file eval_data/{entry['dataset_uri']} is not in {bundle_dir}"
            continue
        fewshot = entry.get("num_fewshot", [0])
        tasks.append(TaskSpec(
            label=label,
            dataset_uri=entry["dataset_uri"],
            task_type=task_type,
            num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
            continuation_delimiter=entry.get("continuation_delimiter", " "),
            random_baseline=baselines[label] / 100.0,
        ))
    listed = {entry["label"] for entry in entries}
    for label in CORE_TASKS:
        if label not in listed:
            missing[label] = f"not listed in {config_path}"
    return tasks, missing


def load_random_baselines(path: Path) -> dict[str, float]:
    """{task label: random-guessing accuracy in percent} from the bundle's eval_meta_data.csv."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or ()):
            raise MalformedDataError(f"{path}: expected columns 'Eval Task' and 'Random baseline'")
        return {row["Eval Task"]: float(row["Random baseline"]) for row in reader}


def load_task_data(bundle_dir: Path, spec: TaskSpec) -> list[dict]:
    """The items of one task, checked against the schema of its task type."""
    path = Path(bundle_dir) / "eval_data" / spec.dataset_uri
    rows = read_jsonl(path, TASK_TYPES[spec.task_type])
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(spec.task_type)
    if options_key is not None:
        for line_number, row in enumerate(rows, start=1):
            options, gold = row[options_key], row["gold"]
            if not isinstance(options, list) or not isinstance(gold, int) or not 0 <= gold < len(options):
                raise MalformedDataError(f"{path}: record {line_number}: 'gold' must index into '{options_key}'")
    return rows
