"""`align serve-rollouts`: a rollout engine in a process of its own (on GPUs of its own), which
trainers reach over HTTP (`sampling.engine: server`, `align.rollout.remote`): TRL's
`vllm_mode="server"`, with the engine Align samples with anywhere (vllm, prefix_shared, hf).

The server starts from the recipe's model config and takes its weights from the trainer before
the first rollout and after every update (`align.rollout.transport`). Requests, JSON unless said:
- `GET /health`: the engine, the dtype the weights must come in, the weights' version.
- `POST /generate` {prompt_ids, params (SamplingParams' fields), group_size}: {completion_ids,
  finished, version}, the engine's own Rollout; the same seed and weights give the same tokens as
  the engine in the trainer's process.
- `POST /weights` (safetensors bytes): load them; {version}.
- `POST /weights/group` {backend}: open the process group of two the trainer sends tensors
  through; {port} of its store. `POST /weights/announce` {tensors: [[name, shape, dtype], ...]}:
  checked, then received in the background while the trainer broadcasts them;
  `POST /weights/commit`: wait for them, load them; {version}.
Every load is the whole model (each weight of the model's `named_parameters`, tied ones under
each name), checked against the model's names and shapes before anything changes.

One request runs on the engine at a time. The server has no authentication: anyone who reaches the
port can replace the weights, so it listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import nn

from align.errors import AlignError
from align.rollout import transport
from align.rollout.sampling import SamplingParams

log = logging.getLogger(__name__)


class ServedModel:
    """An engine and the weights it samples from: their names and shapes (a transformers causal LM's
    `named_parameters`), and how a complete set of them is loaded."""

    def __init__(self, engine, model: nn.Module, dtype: torch.dtype, load):
        """model: the served model's transformers module (its weights, or a skeleton on the meta device)."""
        self.engine, self.dtype, self._load = engine, dtype, load
        self.shapes: dict[str, tuple[int, ...]] = {}
        names_of: dict[int, list[str]] = {}  # tied weights: one parameter under several names
        for name, param in model.named_parameters(remove_duplicate=False):
            self.shapes[name] = tuple(param.shape)
            names_of.setdefault(id(param), []).append(name)
        self.tied = [names for names in names_of.values() if len(names) > 1]
        """Names of one weight (tied embeddings): they must come with equal values."""
        self.version = 0

    @classmethod
    def start(cls, engine_name: str, model_config, tokenizer, sampling, max_model_len: int) -> "ServedModel":
        """The engine `engine_name` for the model `model_config` names (vllm: an empty copy in vLLM; the
        others: the model loaded as plain transformers weights, replaced at the first load)."""
        from align.config import AdapterConfig
        from align.models.loading import load_model

        if engine_name == "server":
            raise AlignError("serve-rollouts --engine: a server cannot sample through another server; "
                             "use vllm, auto, prefix_shared or hf")
        if engine_name == "vllm":
            from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

            from align.models import tiny
            from align.rollout.vllm import VLLMEngine

            path = tiny.resolve(model_config.name_or_path)
            config = AutoConfig.from_pretrained(path, revision=model_config.revision,
                                                trust_remote_code=model_config.trust_remote_code)
            try:  # its EOS ids (an instruct model's end of turn), as from_pretrained reads them
                generation_config = GenerationConfig.from_pretrained(path, revision=model_config.revision)
            except OSError:  # no generation_config.json: the model config's
                generation_config = GenerationConfig.from_model_config(config)
            if model_config.dtype not in (None, "auto"):
                config.dtype = model_config.dtype
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            engine = VLLMEngine(None, tokenizer, sampling.vllm, max_model_len, config=config,
                                weights_dir=path, generation_config=generation_config)
            return cls(engine, skeleton, engine.dtype, engine.load_weights)
        from align.rollout import make_engine

        model = load_model(model_config, AdapterConfig()).eval().requires_grad_(False)
        engine = make_engine(engine_name, model, tokenizer, sampling, max_model_len)
        return cls(engine, model, next(model.parameters()).dtype, lambda weights: copy_into(model, weights))

    def check(self, specs: list[list]) -> None:
        """A ValueError naming the first weight that is unknown, missing or of the wrong shape."""
        given = {name: tuple(shape) for name, shape, _ in specs}
        for name, shape in given.items():
            if name not in self.shapes:
                raise ValueError(f"weight {name!r} is not in the served model (is the trainer's model "
                                 f"the recipe's model.name_or_path the server started from?)")
            if shape != self.shapes[name]:
                raise ValueError(f"weight {name!r} has shape {list(shape)}, the served model's is "
                                 f"{list(self.shapes[name])}")
        missing = sorted(set(self.shapes) - set(given))
        if missing:
            raise ValueError(f"{len(missing)} weights missing, e.g. {missing[:3]}: a load replaces every weight")

    def load(self, weights: dict[str, torch.Tensor]) -> int:
        self.check([transport.spec(name, tensor) for name, tensor in weights.items()])
        for names in self.tied:
            if not all(torch.equal(weights[names[0]], weights[name]) for name in names[1:]):
                raise ValueError(f"{names} are one weight in the served model (tied embeddings), but the trainer "
                                 "sent different values (e.g. a trained lm_head under modules_to_save): train "
                                 "both or neither, or untie them in the model's config")
        self._load((name, tensor.to(self.dtype)) for name, tensor in weights.items())
        self.version += 1
        return self.version


@torch.no_grad()
def copy_into(model: nn.Module, weights) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in weights:
        params[name].copy_(tensor)


class RolloutServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], served: ServedModel, timeout_s: float = 600.0):
        super().__init__(address, Handler)
        self.served, self.timeout_s = served, timeout_s
        self.lock = threading.Lock()  # one engine call or weight load at a time
        self.sync_lock = threading.Lock()  # the weight group and the tensors being received
        self.group: transport.WeightGroup | None = None
        self.pending_group: tuple[threading.Thread, dict] | None = None  # the group being opened
        self.receiving: dict | None = None  # the announced tensors: {"thread", "weights", "error"}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ---- requests -----------------------------------------------------------------------------
    def health(self) -> dict:
        return {"engine": type(self.served.engine).__name__, "dtype": str(self.served.dtype).removeprefix("torch."),
                "version": self.served.version, "weights": len(self.served.shapes)}

    def generate(self, body: dict) -> dict:
        names = {f.name for f in fields(SamplingParams)}
        unknown = set(body.get("params", {})) - names
        if unknown:
            raise ValueError(f"unknown sampling params {sorted(unknown)}")
        params = SamplingParams(**body.get("params", {}))
        with self.lock:
            if self.served.version == 0:
                raise ValueError("no weights loaded yet: the trainer loads them before its first rollout")
            rollout = self.served.engine.generate(body["prompt_ids"], params, int(body.get("group_size", 1)))
            version = self.served.version
        return {"completion_ids": rollout.completion_ids, "finished": rollout.finished, "version": version}

    def load_bytes(self, data: bytes) -> dict:
        weights = transport.decode(data)
        with self.lock:
            return {"version": self.served.load(weights)}

    def open_group(self, body: dict) -> dict:
        backend = body.get("backend", "gloo")
        with self.sync_lock:
            self._refuse_a_second_sync()
            store = transport.WeightGroup.listen(self.server_address[0], 0, self.timeout_s)
            result: dict = {}

            def member():
                try:
                    result["group"] = transport.WeightGroup(store, 1, backend, self.timeout_s)
                except Exception as error:  # noqa: BLE001 - reported at the next announce
                    result["error"] = error

            thread = threading.Thread(target=member, daemon=True)
            thread.start()
            self.pending_group = (thread, result)
        return {"port": store.port}

    def announce(self, body: dict) -> dict:
        specs = body["tensors"]
        self.served.check(specs)
        with self.sync_lock:
            self._refuse_a_second_sync()
            if self.pending_group is not None:
                (thread, result), self.pending_group = self.pending_group, None
                thread.join(self.timeout_s)
                if "group" not in result:
                    raise ValueError(f"the weight group did not open: {result.get('error', 'timed out')}")
                self.group = result["group"]
            if self.group is None:
                raise ValueError("no weight group: POST /weights/group first")
            group, job = self.group, {"weights": {}}

            def receive():
                try:
                    for name, shape, dtype in specs:
                        job["weights"][name] = group.receive(shape, transport.dtype_of(dtype))
                    group.finish()
                except Exception as error:  # noqa: BLE001 - reported by commit
                    job["error"] = error

            job["thread"] = threading.Thread(target=receive, daemon=True)
            job["thread"].start()
            self.receiving = job
        return {"tensors": len(specs)}

    def commit(self) -> dict:
        with self.sync_lock:
            job, self.receiving = self.receiving, None
            if job is None:
                raise ValueError("nothing announced: POST /weights/announce first")
            job["thread"].join(self.timeout_s)
            if job["thread"].is_alive() or "error" in job:
                self.group = None  # a group a transfer failed on is not used again: the trainer opens another
                raise ValueError(f"the announced tensors did not all arrive: {job.get('error', 'timed out')}")
        with self.lock:
            return {"version": self.served.load(job["weights"])}

    def _refuse_a_second_sync(self) -> None:
        if self.receiving is not None and self.receiving["thread"].is_alive():
            raise ValueError("a weight sync is under way: is another trainer using this server? Start one "
                             "`align serve-rollouts` per run")


class Handler(BaseHTTPRequestHandler):
    server: RolloutServer

    def do_GET(self):
        if self.path == "/health":
            return self._reply(200, self.server.health())
        self._reply(404, {"error": f"no GET {self.path}"})

    def do_POST(self):
        routes = {"/generate": lambda: self.server.generate(self._json()),
                  "/weights": lambda: self.server.load_bytes(self._body()),
                  "/weights/group": lambda: self.server.open_group(self._json()),
                  "/weights/announce": lambda: self.server.announce(self._json()),
                  "/weights/commit": lambda: self.server.commit()}
        if self.path not in routes:
            return self._reply(404, {"error": f"no POST {self.path}"})
        try:
            self._reply(200, routes[self.path]())
        except (ValueError, KeyError, TypeError, AlignError) as error:  # the request's fault
            self._reply(400, {"error": f"{type(error).__name__}: {error}"})
        except Exception as error:  # noqa: BLE001 - the trainer gets the message, the server stays up
            log.exception("POST %s failed", self.path)
            self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _json(self) -> dict:
        return json.loads(self._body() or b"{}")

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug(format, *args)


def serve(recipe, engine_name: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve rollouts of `recipe`'s model until interrupted (the recipe's `<algorithm>.sampling`:
    the engine in `sampling.server.engine` unless `engine_name` is given, vLLM's settings, lengths)."""
    from align.models.loading import load_tokenizer

    sampling = getattr(recipe.section, "sampling", None)
    if sampling is None:
        raise AlignError(f"serve-rollouts: algorithm {recipe.algorithm!r} samples nothing (no "
                         f"{recipe.algorithm}.sampling); use a grpo, ppo, rloo, reinforce_pp or distill recipe")
    longest = (sampling.max_prompt_length or recipe.data.max_length) + sampling.max_new_tokens
    served = ServedModel.start(engine_name or sampling.server.engine, recipe.model, load_tokenizer(recipe.model),
                               sampling, longest)
    server = RolloutServer((host, port), served, sampling.server.timeout_s)
    print(f"align serve-rollouts: {type(served.engine).__name__} for {recipe.model.name_or_path} on {server.url} "
          "(waiting for weights from the trainer)", flush=True)
    def stop(signum, frame):  # SIGTERM as Ctrl-C: the engine shuts its worker processes down on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        shutdown = getattr(served.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
