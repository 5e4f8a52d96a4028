"""ONNX export of a trained run: classifier (+ its CAM), image encoder (LoRA merged), prompt
encoder + mask decoder. Each graph is checked against PyTorch (max abs difference) when written.

Files in the output folder:

* ``classifier.onnx``: slices (B,1,S,S) in [0,1] -> logits (B,), cams (B,S,S) in [0,1]. The CAM
  is the classifier's GradCAM; its logit pools a linear map of the CAM layer (mean or
  log-mean-exp), so GradCAM's weights are the same for every input, and the CAM is written in closed form
  (`graphs.linear_cam_weights`, `graphs.ClassifierWithCam`): no backward pass.
* ``encoder.onnx``: one slice (1,1,S,S) in [0,1] -> embeddings (1,256,64,64).
* ``encoder-int8.onnx``: the same with its weight MatMuls in int8 (`quantize_encoder`), for
  `sammix predict --precision int8`; its relative embedding error is measured at export.
* ``decoder.onnx``: embeddings (1,256,64,64), box (1,4) xyxy in S-pixel coordinates, mask_prompt
  (1,1,256,256) logits (absent when the run's mask_prompt is "none") -> masks (1,3,S,S) logits,
  scores (1,3) predicted IoU. One slice per call.
* ``decoder-refine.onnx``: the same through the refining decoder (`SamMix.refining_decoder`),
  which `ModelConfig.refine` asks a second time with the box of the first mask; box only.
* ``export.json``: the settings a consumer needs (S, window, thresholds) and the checks.

Boxes and mask prompts come from the CAM as in `sammix.models.cam.CamPrompter.prompts`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from sammix import __version__
from sammix.config import INFERENCE_SETTINGS
from sammix.errors import SammixError
from sammix.inference.graphs import DecoderForExport, EncoderForExport, closed_form_cam, inference_encoder
from sammix.inference.sessions import FILES, onnx_session

OPSET = 17
FORMAT = "sammix-onnx/3"  # 2: the CAM is kept on tissue (models.cam.on_tissue); 3: the refining decoder
TOLERANCE = {"classifier": 1e-3, "encoder": 1e-3, "decoder": 1e-2, "decoder_refine": 1e-2}  # max abs diff allowed at export
INT8_MAX_REL_ERROR = 0.15  # |int8 - fp32| / |fp32| of the embeddings allowed at export (typically 0.05-0.07)


# ---------------------------------------------------------------------------------------------
# export


def state_key(state: dict, model_cfg, size: int) -> str:
    """sha256 of what decides the exported graphs: the trained tensors (`SamMix.trained_state`, as a
    run's weights file holds them), the base weights, the architecture settings, S and the versions
    (not thresholds, window or the other `INFERENCE_SETTINGS`: those stay in Python)."""
    digest = hashlib.sha256()
    for part in ("classifier", "sam"):
        for name in sorted(state[part]):
            digest.update(name.encode())
            digest.update(state[part][name].detach().cpu().contiguous().numpy().tobytes())
    arch = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in INFERENCE_SETTINGS}
    digest.update(json.dumps({"base": state["base_weights"], "model": arch, "size": size,
                              "sammix": __version__, "torch": torch.__version__, "opset": OPSET, "format": FORMAT},
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


def model_key(model) -> str:
    return state_key(model.trained_state(), model.cfg, int(model.prep.size))


def _sample_slices(size: int, n: int = 2) -> torch.Tensor:
    """Fixed check slices (n, 1, S, S) in [0, 1] that look enough like abdominal CT at level 40 /
    width 400 to exercise every part of the graphs: a body of soft tissue with an organ of slightly
    brighter parenchyma on the image's left, a bright spine and ribs, fat and a little noise."""
    yy, xx = np.mgrid[:size, :size] / size
    rng = np.random.default_rng(0)
    slices = []
    for k in range(n):
        shift = 0.03 * k  # the organ moves a little from slice to slice
        body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.52) / 0.33) ** 2 <= 1
        organ = ((xx - 0.33 - shift) / 0.17) ** 2 + ((yy - 0.45) / 0.15) ** 2 <= 1
        spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.74) / 0.05) ** 2 <= 1
        ring = body & ~(((xx - 0.5) / 0.38) ** 2 + ((yy - 0.52) / 0.29) ** 2 <= 1)
        image = np.where(body, 0.55, 0.0) + 0.08 * organ + 0.4 * spine + 0.25 * ring * (np.sin(40 * xx) > 0.6)
        image = image - 0.25 * (body & (yy > 0.78) & ~spine)  # posterior fat
        slices.append(np.clip(image + 0.02 * rng.standard_normal((size, size)) * body, 0, 1))
    return torch.from_numpy(np.stack(slices).astype(np.float32))[:, None]


def _export(module, args, path, names_in, names_out, dynamic_axes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic_axes, do_constant_folding=True)


def _outputs(session, feeds: dict, expected) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ONNX Runtime output, PyTorch reference) pairs for torch-tensor feeds."""
    got = session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
    return [(g, e.detach().cpu().numpy()) for g, e in zip(got, expected)]


def _max_diff(session, feeds: dict, expected) -> float:
    return max(float(np.abs(g - e).max()) for g, e in _outputs(session, feeds, expected))


def _relative_error(session, feeds: dict, expected) -> float:
    return max(float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in _outputs(session, feeds, expected))


def export_model(model, out, key: str | None = None) -> Path:
    """Write the three ONNX graphs of a SamMix into folder `out` (checked, atomically) -> out."""
    model = model.eval()
    clf = closed_form_cam(model)
    if clf is None:
        raise SammixError(f"cannot export the CAM of classifier {model.cfg.classifier!r} at layer "
                          f"{model.prompter.layer!r}: its logit is not a spatial mean of a linear map of that layer")
    out = Path(out)
    device = model.device
    s = int(model.prep.size)
    x = _sample_slices(s, 3).to(device)
    enc = EncoderForExport(model.sam, inference_encoder(model).to(device)).eval()
    dec = DecoderForExport(model.sam, s).eval()
    refiner = DecoderForExport(model.sam, s, model.refining_decoder()).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is as readable as the run it sits in
    try:
        with torch.no_grad():
            ref_logits, ref_cams = model.prompter.compute(x)  # autograd GradCAM, the reference
            _, mine = clf(x)
            cam_diff = float((mine - ref_cams).abs().max())
            boxes, mask_prompts = model.prompter.prompts(ref_cams)
            x1 = x[1:2]
            emb_ref = model.sam.encode(x1)  # LoRA unmerged, BN unfused: the training-time encoder
            dec_args = (emb_ref, boxes[1:2].to(device))
            dec_names = ["embeddings", "box"]
            if mask_prompts is not None:  # mask_prompt "none": box only, SAM's no-mask embedding
                dec_args += (mask_prompts[1:2].to(device),)
                dec_names.append("mask_prompt")
            dec_ref = model.sam.decode(*dec_args, multimask=True, size=s)
            refine_args = dec_args[:2]
            refine_ref = refiner(*refine_args)
            # The classifier takes any batch (checked below on another batch size than exported);
            # TinyViT bakes its batch size into reshapes when traced, so encoder and decoder take one
            # slice per call (ONNX Runtime is as fast per slice at batch 1 as at batch 4 here).
            _export(clf, (x[:2],), tmp / FILES["classifier"], ["slices"], ["logits", "cams"],
                    {"slices": {0: "batch"}, "logits": {0: "batch"}, "cams": {0: "batch"}})
            _export(enc, (x1,), tmp / FILES["encoder"], ["slices"], ["embeddings"])
            _export(dec, dec_args, tmp / FILES["decoder"], dec_names, ["masks", "scores"])
            _export(refiner, refine_args, tmp / FILES["decoder_refine"], dec_names[:2], ["masks", "scores"])
        quantize_encoder(tmp / FILES["encoder"], tmp / FILES["encoder_int8"])
        diffs = {
            "classifier": _max_diff(onnx_session(tmp / FILES["classifier"]), {"slices": x}, (ref_logits, ref_cams)),
            "encoder": _max_diff(onnx_session(tmp / FILES["encoder"]), {"slices": x1}, (emb_ref,)),
            "decoder": _max_diff(onnx_session(tmp / FILES["decoder"]),
                                 dict(zip(dec_names, dec_args)), dec_ref),
            "decoder_refine": _max_diff(onnx_session(tmp / FILES["decoder_refine"]),
                                        dict(zip(dec_names, refine_args)), refine_ref),
        }
        int8_error = _relative_error(onnx_session(tmp / FILES["encoder_int8"]), {"slices": x1}, (emb_ref,))
        bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE[k]}
        if bad or not cam_diff <= TOLERANCE["classifier"]:
            raise SammixError(f"ONNX export does not match PyTorch (max abs diff {bad or {'cam': cam_diff}}, "
                              f"allowed {TOLERANCE})")
        if not int8_error <= INT8_MAX_REL_ERROR:
            raise SammixError(f"the int8 encoder moves the embeddings by {int8_error:.0%} "
                              f"(allowed {INT8_MAX_REL_ERROR:.0%})")
        manifest = {
            "format": FORMAT,
            "key": key or model_key(model),
            "files": FILES,
            "size": s,
            "organ": model.prep.organ,
            "decoder_inputs": dec_names,
            # how the run that was exported uses the graphs (sammix itself reads them from the run):
            "settings": {"window": model.prep.window, "cls_threshold": model.cfg.cls_threshold,
                         "cam_threshold": model.cfg.cam_threshold, "organ_levels": model.cfg.organ_levels,
                         "mask_prompt": {"scale": model.prompter.mask_scale, "mode": model.prompter.mask_mode}},
            "max_abs_diff_vs_pytorch": {**diffs, "closed_form_cam_vs_autograd": cam_diff},
            "int8_encoder_relative_error": int8_error,
            "sammix_version": __version__,
            "torch_version": torch.__version__,
            "opset": OPSET,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1))
        try:
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except OSError:  # another process wrote the same export at the same time: theirs will do
            done = read_manifest(out)
            if done is None or done.get("key") != manifest["key"]:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def quantize_encoder(src: Path, dst: Path) -> None:
    """The int8 encoder: every MatMul with a constant weight (the transformer's linear layers, two
    thirds of the encoder's FLOPs) gets per-output-channel 8-bit weights and per-call uint8
    activations (ONNX Runtime's dynamic quantisation). Convolutions and the attention products
    stay fp32: quantising those too moved the embeddings by 19-27%. Weights are uint8: with
    onnxruntime 1.32, signed int8 weights moved the LiteMedSAM embeddings by 19%, uint8 by 8%."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    weights = {w.name for w in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes)


def read_manifest(folder) -> dict | None:
    path = Path(folder) / "export.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or not all((Path(folder) / f).is_file() for f in FILES.values()):
        return None
    return manifest


def _cache_folder(key: str, cache_dir: Path | None = None) -> Path:
    from sammix.data.cache import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "onnx" / key[:20]


def find_export(key: str, run: Path | None = None, cache_dir: Path | None = None) -> Path | None:
    """The export whose key is `key`: RUN/onnx if it matches, else $SAMMIX_CACHE/onnx/<key>; or None."""
    candidates = [Path(run) / "onnx"] if run is not None else []
    for folder in [*candidates, _cache_folder(key, cache_dir)]:
        manifest = read_manifest(folder)
        if manifest is not None and manifest.get("key") == key:
            return folder
    return None


def cached_export(model, run: Path | None = None, cache_dir: Path | None = None, notify=None) -> Path:
    """The ONNX export of this exact model: RUN/onnx if it matches, else one in the cache
    ($SAMMIX_CACHE/onnx/<key>), written on first use (`notify(folder)` is called before)."""
    key = model_key(model)
    found = find_export(key, run, cache_dir)
    if found is not None:
        return found
    cached = _cache_folder(key, cache_dir)
    if notify is not None:
        notify(cached)
    return export_model(model, cached, key)


class ExportedRun:
    """A trained run served by its ONNX export alone (`load_exported`): what `Engine` (backend
    "onnx") and `predict` read of a SamMix (settings and thresholds), without building
    the PyTorch model, so `sammix predict` starts seconds sooner."""

    device = torch.device("cpu")

    def __init__(self, cfg, weights: dict, onnx_dir: Path):
        self.cfg = cfg.model.calibrated(weights)
        self.prep = cfg.prep
        self.onnx_dir = Path(onnx_dir)

    def eval(self) -> "ExportedRun":
        return self


def load_exported(run) -> ExportedRun | None:
    """The run as an `ExportedRun` when an export of its best weights exists (RUN/onnx or the
    cache, the same key `cached_export` uses), else None."""
    from sammix.config import RunConfig
    from sammix.runfolder import RunFolder

    run = RunFolder(run).check()
    cfg = RunConfig.load(run.config)
    weights = run.load_weights()
    weights = weights.get("model", weights)
    if not all(part in weights for part in ("classifier", "sam", "base_weights")):
        return None
    folder = find_export(state_key(weights, cfg.model, int(cfg.prep.size)), run.path)
    return None if folder is None else ExportedRun(cfg, weights, folder)


def export_onnx(run, out=None) -> Path:
    """`sammix export --run RUN --format onnx`: write RUN/onnx (or `out`) and return the folder."""
    from sammix.models.sammix import SamMix

    model = SamMix.load(run, device="cpu")
    return export_model(model, Path(out) if out is not None else Path(run) / "onnx")
