"""Checks a job passes before Ray starts: shards resolve, the model folder and metric backbones can load,
factories import, the resources fit, the output is durable. Imports no torch and no Ray, so `inversa
validate` runs on a machine without the GPU stack (checks that need it say so instead).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
from collections import defaultdict
from pathlib import Path

import fsspec

from pipeline.config import JobConfig, MetricsConfig, ResourcesConfig, StageResources
from pipeline.errors import JobError
from pipeline.factories import factory_problem
from pipeline.methods.editor_windows import Combination
from pipeline.stages.read import expand_shards
from pipeline.training.artefact import (
    COND_VAE_KIND,
    DIFFUSION_CLIP_KIND,
    NULL_TEXT_VAE_KIND,
    ZIP_ENCODER_KIND,
    ArtefactError,
    check_base_model,
    read_manifest,
    verified_weights,
)

EDITOR_KINDS = (DIFFUSION_CLIP_KIND, ZIP_ENCODER_KIND)

# The stages run as actor pools (ActorPoolStrategy); the other stages of ResourcesConfig run as tasks.
ACTOR_STAGES = ("invert_edit", "score")
GLOB_CHARACTERS = "*?["
MODEL_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LPIPS_TRUNKS = {"lpips-alex": "alexnet", "lpips-vgg": "vgg16", "lpips-squeeze": "squeezenet1_1"}


def stage_resources(resources: ResourcesConfig) -> dict[str, StageResources]:
    """Every stage's resources by stage name: the StageResources fields of ResourcesConfig."""
    stages = {field.name: getattr(resources, field.name) for field in dataclasses.fields(resources)}
    return {name: stage for name, stage in stages.items() if isinstance(stage, StageResources)}


def resource_shortfall(resources: ResourcesConfig, cluster: dict[str, float]) -> str | None:
    """Why the job's stages cannot all run at once on `cluster` (ray.cluster_resources()), or None.

    Actor pools (ACTOR_STAGES) hold their CPUs and GPUs for the whole job; the task stages (every other
    stage of ResourcesConfig) need what is left. If the pools take every CPU, no read task is ever
    scheduled and the job waits forever.
    """
    stages = stage_resources(resources)
    pools = {name: stage for name, stage in stages.items() if name in ACTOR_STAGES}
    tasks = {name: stage for name, stage in stages.items() if name not in ACTOR_STAGES}
    for unit, field_name in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        held = sum(stage.actors * getattr(stage, field_name) for stage in pools.values())
        task_name, task = max(tasks.items(), key=lambda item: getattr(item[1], field_name))
        needed = held + getattr(task, field_name)
        available = float(cluster.get(unit, 0.0))
        if needed > available + 1e-9:
            pool_terms = " + ".join(
                f"resources.{name}: {stage.actors} x {getattr(stage, field_name)}"
                for name, stage in pools.items()
            )
            return (
                f"the actor pools hold {held:g} {unit} ({pool_terms}) and resources.{task_name}.{field_name} "
                f"needs {getattr(task, field_name):g} more, but the cluster has {available:g} {unit}; lower "
                f"the pools' actors or {field_name}, or run on a bigger cluster"
            )
    return None


def local_resources() -> dict[str, float]:
    """What a local Ray started here would offer: this process's CPUs and the visible NVIDIA GPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([device for device in visible.split(",") if device.strip() not in ("", "-1")])
    else:
        gpus = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    return {"CPU": float(cpus), "GPU": float(gpus)}


def resolve_shards(patterns: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """Expand brace ranges and globs of input.shards and check that every shard exists.

    Brace ranges expand without listing (`shard-{000000..000127}.tar`); a pattern with * ? or [ is
    globbed. Existence is checked with one listing per folder, not one request per shard.

    Returns:
        (shard URLs in order without repeats, one entry per URL or pattern that matches nothing,
        with the reason when the store could not be listed).
    """
    urls: list[str] = []
    missing: list[str] = []
    for url in expand_shards(patterns):
        if any(character in url.rsplit("/", 1)[-1] for character in GLOB_CHARACTERS):
            try:
                matches = _glob(url)
            except Exception as error:  # credentials, network, permissions: say which
                matches, url = [], f"{url} (cannot list: {type(error).__name__}: {error})"
            missing += [] if matches else [url]
        else:
            matches = [url]
        urls += [match for match in matches if match not in urls]
    found, unlisted = _existing(urls)
    missing += [unlisted.get(url, url) for url in urls if url not in found]
    return urls, missing


def _glob(pattern: str) -> list[str]:
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return [f"{prefix}{path}" for path in sorted(fs.glob(pattern))]


def _existing(urls: list[str]) -> tuple[set[str], dict[str, str]]:
    """(the URLs among `urls` that name existing files, URL -> why its folder could not be listed);
    one listing per folder."""
    by_folder: dict[tuple, list[str]] = defaultdict(list)
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        by_folder[(id(fs), path.rsplit("/", 1)[0])].append(url)
    found: set[str] = set()
    unlisted: dict[str, str] = {}
    for folder_urls in by_folder.values():
        fs, first = fsspec.core.url_to_fs(folder_urls[0])
        try:
            listing = set(fs.ls(first.rsplit("/", 1)[0], detail=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:  # listing not allowed: reading each shard will tell
            found |= set(folder_urls)
            continue
        except Exception as error:  # credentials, network: name the folder and the cause
            reason = f"cannot list: {type(error).__name__}: {_first_line(str(error))}"
            unlisted |= {url: f"{url} ({reason})" for url in folder_urls}
            continue
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in listing}
        found |= {url for url in folder_urls if url.rstrip("/").rsplit("/", 1)[-1] in names}
    return found, unlisted


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def model_problems(path: str, image_size: int | None = None) -> list[str]:
    """Why model.path cannot be loaded, read from its configs and weight files (no weights loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        if path.count("/") == 1 and not path.startswith((".", "/")) and _hub_cached(path):
            return []
        return [
            f"model.path {path!r}: no such folder (and not a Hugging Face hub id in this machine's cache); "
            "point it at a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        ]
    problems = []
    for part, config_name in MODEL_PARTS.items():
        config = folder / part / config_name
        try:
            json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            problems.append(f"model.path {path!r}: {part}/{config_name} cannot be read ({error})")
            continue
        if not any(file.name.endswith(WEIGHT_SUFFIXES) for file in (folder / part).iterdir()):
            problems.append(f"model.path {path!r}: {part}/ holds no weight file (*.safetensors or *.bin)")
    if not (folder / "tokenizer").is_dir():
        problems.append(f"model.path {path!r}: tokenizer/ is missing")
    if not problems and image_size is None:
        vae = json.loads((folder / "vae/config.json").read_text())
        unet = json.loads((folder / "unet/config.json").read_text())
        if "sample_size" not in unet or "block_out_channels" not in vae:
            problems.append(
                f"model.path {path!r}: unet/vae configs do not give the image size; set model.image_size"
            )
    return problems


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def backbone_problems(metrics: MetricsConfig) -> list[str]:
    """Why the metric backbones of the spec cannot load (CLIP model name, checkpoint and config files,
    cached trunk weights; the factories are `factory_problems`)."""
    problems = _clip_problems(metrics.clip)
    if metrics.perceptual in LPIPS_TRUNKS:
        problems += _lpips_problems(metrics.perceptual)
    return problems


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _clip_problems(clip) -> list[str]:
    problems = []
    if clip.config_file is not None and not Path(clip.config_file).is_file():
        problems.append(f"metrics.clip.config_file {clip.config_file!r}: no such file")
    tag = clip.pretrained if clip.pretrained and not _looks_like_path(clip.pretrained) else None
    if clip.pretrained and tag is None and not Path(clip.pretrained).is_file():
        problems.append(f"metrics.clip.pretrained {clip.pretrained!r}: no such checkpoint file")
    try:
        import open_clip
    except ImportError:
        return problems  # the submitting machine may lack the GPU stack; the workers check the rest
    if clip.config_file is None and clip.model_name not in open_clip.list_models():
        problems.append(
            f"metrics.clip.model_name {clip.model_name!r} is not an open_clip model; choose one of "
            "open_clip.list_models() or give its config as metrics.clip.config_file"
        )
    elif tag is not None and (clip.model_name, tag) not in {
        tuple(pair) for pair in open_clip.list_pretrained()
    }:
        problems.append(
            f"metrics.clip: ({clip.model_name!r}, pretrained {tag!r}) is not an open_clip pair; "
            "see open_clip.list_pretrained(), or give a checkpoint path"
        )
    return problems


def _lpips_problems(backbone: str) -> list[str]:
    hub = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    checkpoints = hub.expanduser() / "hub" / "checkpoints"
    trunk = LPIPS_TRUNKS[backbone]
    if not list(checkpoints.glob(f"{trunk}-*.pth")):
        return [
            f"metrics.perceptual {backbone!r}: torchvision's {trunk} weights are not in {checkpoints}; "
            "pre-cache them (see pipeline/metrics/perceptual.py) or choose features:NAME"
        ]
    return []


def durable_output(path: str) -> str:
    """output.path as the job will use it: a relative local path made absolute.

    Raises:
        JobError: an output that does not outlive the process (memory://).
    """
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    if protocol == "memory":
        raise JobError(
            f"output {path!r} lives in the job's process memory and is lost when it ends; "
            "give a folder or an object-store URL (s3://, gs://)"
        )
    if protocol == "file":
        local = path.split("://", 1)[-1]
        return str(Path(local).expanduser().resolve())
    return path


def job_problems(config: JobConfig, cluster: dict[str, float] | None) -> tuple[list[str], list[str]]:
    """Every pre-flight check of a job.

    Args:
        config: the job spec.
        cluster: the resources the job gets (None: not checked).

    Returns:
        (the shard URLs, one line per problem).
    """
    shards, missing = resolve_shards(config.input.shards)
    problems = []
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        problems.append(
            f"input.shards: {len(missing)} not found ({len(shards)} shard URLs resolved): {shown}"
        )
    problems += model_problems(config.model.path, config.model.image_size)
    problems += backbone_problems(config.metrics)
    problems += factory_problems(config)
    problems += editor_problems(config)
    problems += embedding_vae_problems(config)
    problems += null_text_vae_problems(config)
    if cluster is not None:
        shortfall = resource_shortfall(config.resources, cluster)
        problems += [f"resources: {shortfall}"] if shortfall else []
    try:
        durable_output(config.output.path)
    except JobError as error:
        problems.append(f"output.path: {error}")
    return shards, problems


def factory_problems(config: JobConfig) -> list[str]:
    """Why the factories the metrics config names cannot be imported (one line each)."""
    problems = []
    for key in ("feature_extractor", "classifier"):
        reference = getattr(config.metrics, key)
        problem = factory_problem(reference, f"metrics.{key}") if reference else None
        problems += [problem] if problem else []
    return problems


def editor_problems(config: JobConfig) -> list[str]:
    """Why the trained editors the edits name cannot be used (one line each).

    Each artefact must exist and be a DiffusionCLIP editor or a ZIP encoder; a ZIP encoder edits alone,
    and only it takes a reference image, which must exist. Where torch is installed here and model.path
    is a folder that loads, the model is loaded on the CPU once to refuse editors trained on another
    base model (by fingerprint); elsewhere the invert/edit actors refuse them when they start.
    """
    uris = list(dict.fromkeys(ref.uri for spec in config.edits for ref in spec.editors))
    problems, manifests = _artefact_problems(config, uris, EDITOR_KINDS, "an editor")
    lines = [f"edits.editors: {problems[uri]}" for uri in uris if uri in problems]
    kinds = {uri: manifest["kind"] for uri, manifest in manifests.items()}
    for index, spec in enumerate(config.edits):
        lines += _zip_edit_problems(f"edits[{index}].editors", spec.editors, kinds, spec.combination)
    return lines + _window_problems(config)


def _window_problems(config: JobConfig) -> list[str]:
    """Editor windows that start after the model's last timestep (read from the model folder's
    scheduler config, so without torch; where there is none, the edit refuses them row by row)."""
    timesteps = _train_timesteps(config.model.path)
    if timesteps is None:
        return []
    return [
        f"edits[{index}].editors: window {list(ref.window)} of {ref.uri!r} starts after the model's last "
        f"timestep {timesteps - 1}; give it a low end below {timesteps}"
        for index, spec in enumerate(config.edits)
        for ref in spec.editors
        if ref.window is not None and ref.window[0] >= timesteps
    ]


def _train_timesteps(path: str) -> int | None:
    """The scheduler's T (num_train_timesteps, diffusers' default 1000) of a local model folder."""
    scheduler_config = Path(path) / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(scheduler_config.read_text()).get("num_train_timesteps", 1000))
    except (OSError, ValueError, TypeError):
        return None


def embedding_vae_problems(config: JobConfig) -> list[str]:
    """Why the conditional-embedding VAEs of `stochastic: cond_vae` edits cannot be used (one line each):
    missing, unfinished or corrupt, of another kind, or trained on another base model (as for editors)."""
    uris = list(dict.fromkeys(spec.vae for spec in config.edits if spec.vae is not None))
    problems, manifests = _artefact_problems(config, uris, (COND_VAE_KIND,), "a conditional-embedding VAE")
    _verify_vae_weights(manifests, problems)
    return [
        f"edits[{index}].vae: {problems[spec.vae]}"
        for index, spec in enumerate(config.edits)
        if spec.vae in problems
    ]


def _verify_vae_weights(manifests: dict[str, dict], problems: dict[str, str]) -> None:
    """Add to `problems` every usable VAE whose weights do not match its version. A VAE is small, so its
    weights are read here to catch a modified or partial file."""
    for uri, manifest in manifests.items():
        if uri in problems:
            continue
        try:
            verified_weights(uri, manifest)
        except ArtefactError as error:
            problems[uri] = str(error)


def null_text_vae_problems(config: JobConfig) -> list[str]:
    """Why the dataset-wide null-text VAE that `inversion.vae` names cannot be used: missing, corrupt, of
    another kind, trained on another base model, or trained on null-text inversions made with other
    settings than the job's (steps, w, N, lr, epsilon: its phi_t would come from another distribution)."""
    uri = getattr(config.inversion.method_params, "vae", None)
    if uri is None:
        return []
    problems, manifests = _artefact_problems(config, [uri], (NULL_TEXT_VAE_KIND,), "a null-text VAE")
    _verify_vae_weights(manifests, problems)
    if uri not in problems:
        problems.update(_null_text_settings_problem(config, uri, manifests[uri]["config"]))
    return [f"inversion.vae: {problems[uri]}"] if uri in problems else []


def _null_text_settings_problem(config: JobConfig, uri: str, trained: dict) -> dict[str, str]:
    params = config.inversion.method_params
    used = {
        "num_steps": config.inversion.num_steps,
        "guidance_scale": config.inversion.guidance_scale,
        "inner_steps": params.inner_steps,
        "learning_rate": params.learning_rate,
        "early_stop_epsilon": params.early_stop_epsilon,
    }
    trained_with = {
        "num_steps": trained.get("steps"),
        "guidance_scale": trained.get("guidance_scale"),
        **{key: trained.get(key) for key in ("inner_steps", "learning_rate", "early_stop_epsilon")},
    }
    differing = [key for key in used if trained_with[key] != used[key]]
    if not differing:
        return {}
    shown = ", ".join(f"{key} {trained_with[key]!r} (the job: {used[key]!r})" for key in differing)
    return {
        uri: f"VAE {uri!r} was trained on null-text inversions with {shown}; invert with its settings or "
        "train one with the job's"
    }


def _artefact_problems(
    config: JobConfig, uris: list[str], kinds: tuple[str, ...], what: str
) -> tuple[dict[str, str], dict[str, dict]]:
    """Per URI, why the artefact cannot be used; and the manifests of the usable ones."""
    problems, manifests = {}, {}
    for uri in uris:
        try:
            manifest = read_manifest(uri)
        except ArtefactError as error:
            problems[uri] = str(error)
            continue
        if manifest["kind"] not in kinds:
            problems[uri] = (
                f"artefact {uri!r} is a {manifest['kind']!r} artefact, not {what} "
                f"({' or '.join(kinds)}); name an artefact of `inversa train` with one of those kinds"
            )
            continue
        manifests[uri] = manifest
    local_model = Path(config.model.path).is_dir() and not model_problems(config.model.path)
    if manifests and local_model and importlib.util.find_spec("torch") is not None:
        fingerprint = _model_fingerprint(config.model.path)
        for uri, manifest in manifests.items():
            try:
                check_base_model(manifest, uri, fingerprint, config.model.path)
            except ArtefactError as error:
                problems[uri] = str(error)
    return problems, manifests


def _zip_edit_problems(where: str, editors, kinds: dict[str, str], combination: Combination) -> list[str]:
    """A ZIP encoder combined with other editors or as a conjunction; a reference on a non-ZIP editor or
    one that is missing."""
    lines = []
    zip_refs = [ref for ref in editors if kinds.get(ref.uri) == ZIP_ENCODER_KIND]
    if zip_refs and len(editors) > 1:
        lines.append(f"{where}: ZIP encoder {zip_refs[0].uri!r} edits alone; give it an edit of its own")
    elif zip_refs and combination != "convex":
        lines.append(
            f"{where}: ZIP encoder {zip_refs[0].uri!r} takes no combination; leave out combination: {combination}"
        )
    for ref in editors:
        if ref.reference is None:
            continue
        if ref.uri in kinds and kinds[ref.uri] != ZIP_ENCODER_KIND:
            lines.append(
                f"{where}: reference {ref.reference!r} steers ZIP encoders only; {ref.uri!r} is not one"
            )
        elif not _exists(ref.reference):
            lines.append(
                f"{where}: reference image {ref.reference!r} does not exist; give a PNG or JPEG path or URI"
            )
    return lines


def _exists(uri: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.exists(path)
    except (OSError, ValueError, ImportError):
        return False


@functools.lru_cache(maxsize=4)
def _model_fingerprint(path: str) -> str:
    """The fingerprint of the model at `path`, loaded on the CPU (the GPU stack is imported only here)."""
    import torch

    from pipeline.models.loading import load_diffusion_model

    return load_diffusion_model(path, torch.device("cpu"), torch.float32).fingerprint
