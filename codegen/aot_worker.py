"""The compiling half of codegen/aot.py, run by path in a process of its own.

Triton decides at import whether it interprets: a process whose Triton was imported with
TRITON_INTERPRET=1 (the test suite's, a CPU run's) holds only the interpreter's stand-ins for
Triton's own library functions (tl.sigmoid, tl.cdiv, …), which the compiler refuses. This process
imports Triton with the interpreter off and needs nothing of slimfx: it reads jobs as JSON on
stdin — a kernel source file, the dtypes of its pointer arguments in order, launch configurations
(with the integer arguments of a sample call), a compute capability — and writes, per job and configuration, the argument types, the PTX,
the shared memory a block uses and what ptxas reports of the registers (registers per thread, bytes
of spill stores and loads: Triton keeps these only once a driver loads the binary, so the PTX is
assembled once more here with `ptxas -v`, ~70 ms) as JSON on stdout. A source that does not compile ends the process
with Triton's error and the file's name on stderr.
"""
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MARK = "aot_worker: "  # starts the error it reports, after whatever Triton warned on stderr


def _jitted(path: str):
    spec = importlib.util.spec_from_file_location("slimfx_aot_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def _specialized(fn, pointers: list[str], ints: dict) -> tuple[dict, dict, dict]:
    """(argument types, constants, attributes) as Triton's JIT makes them for a call whose integer
    arguments are `ints` (those not given stay general) and whose pointers are 16-byte aligned:
    an integer 1 becomes a constant, a multiple of 16 gets a divisibility hint, as does every
    pointer."""
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    left = iter(pointers)
    types, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*" + next(left)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif ints.get(name) == 1:
            types[name], constants[name] = "constexpr", 1
        else:
            types[name] = "i32"
            if name in ints and ints[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    if next(left, None) is not None or sum(t.startswith("*") for t in types.values()) != len(pointers):
        raise ValueError(f"{len(pointers)} pointer dtypes for the pointer arguments of {list(types)}")
    return types, constants, attrs


def _registers(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes of `ptx` as ptxas assembles it for `arch`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:  # ptxas's own message, not only the command that failed
        raise RuntimeError(f"ptxas failed ({done.returncode}) on the kernel's PTX: {log[-2000:]}")
    used = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if used is None or spills is None:
        raise RuntimeError(f"ptxas -v printed no register usage: {log[-2000:]}")
    return {"registers": int(used[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2])}


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for job in json.load(sys.stdin):
        try:
            fn = _jitted(job["path"])
            built = []
            for config in job["configs"]:
                types, constants, attrs = _specialized(fn, job["pointers"], config.get("ints", {}))
                source = ASTSource(fn=fn, signature=types, constexprs={**constants, **config["kwargs"]}, attrs=attrs)
                done = triton.compile(source,
                                      target=GPUTarget("cuda", job["arch"], 32),
                                      options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
                built.append({"types": types, "ptx": done.asm["ptx"], "shared": int(done.metadata.shared),
                              **_registers(done.asm["ptx"], job["arch"])})
        except Exception as e:  # noqa: BLE001 - any compiler error, reported with the file it came from
            print(f"{MARK}{job['path']}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        results.append(built)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
