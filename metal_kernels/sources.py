"""Whole translation units around the rendered kernels (KDA, MLA, MoE), for checks outside MLX.

MLX wraps a kernel body in its own signature (inputs, `<name>_shape` arrays for names the body
mentions, outputs, then builtins on Metal / template constants on CUDA). These functions build
the same wrapper so that

  * g++ can compile the Metal text against metal_stub.h (syntax check, or CPU emulation with a
    generated main()), and
  * nvcc can compile the CUDA text for sm_90 with a small stand-in for MLX's device headers.

Template arguments are (name, value) pairs; a value is an int, a bool, or a dtype name
('float32', 'bfloat16', 'float16').
"""
from __future__ import annotations

from . import mla_template, moe_template
from .dialect import CUDA, METAL
from .kda_template import DECODE_INPUTS, DECODE_OUTPUTS, PREFILL_INPUTS, prefill_outputs
from .kda_template import render as _kda_render

METAL_TYPES = {"float32": "float", "bfloat16": "bfloat16_t", "float16": "float16_t",
               "int32": "int", "uint32": "uint"}
CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half",
              "int32": "int32_t", "uint32": "uint32_t"}

# The builtins MLX's Metal wrapper adds when the body mentions them (its order and types).
_METAL_BUILTINS = [
    ("simdgroup_index_in_threadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
]


def render(dialect, kind: str, prof: bool = False) -> tuple[str, str]:
    """(header, body) of any kernel kind: the KDA 'prefill'/'decode', an 'mla_*' or a 'moe_*' one."""
    if kind.startswith("mla_"):
        return mla_template.render(dialect, kind)
    if kind.startswith("moe_"):
        return moe_template.render(dialect, kind)
    return _kda_render(dialect, kind, prof)


def io_names(kind: str, dialect, prof: bool = False) -> tuple[list[str], list[str]]:
    if kind.startswith("mla_"):
        return mla_template.inputs(kind), mla_template.outputs(kind, dialect)
    if kind.startswith("moe_"):
        return moe_template.inputs(kind), moe_template.outputs(kind, dialect)
    if kind == "prefill":
        return PREFILL_INPUTS, prefill_outputs(dialect, prof)
    return DECODE_INPUTS, DECODE_OUTPUTS


def _template_value(v, types) -> tuple[str, str]:
    if isinstance(v, bool):
        return "bool", "true" if v else "false"
    if isinstance(v, int):
        return "int", str(v)
    return "typename", types[v]


def _params(body: str, inputs, in_dtypes, outputs, out_dtypes, types, dialect) -> list[str]:
    ps = []
    for n in inputs:
        t = types[in_dtypes[n]]
        ps.append(f"const device {t}* {n}" if dialect is METAL else f"const {t}* {n}")
        if f"{n}_shape" in body:
            ps.append(f"const constant int* {n}_shape" if dialect is METAL
                      else f"const __grid_constant__ Shape {n}_shape")
    for n in outputs:
        t = types[out_dtypes[n]]
        ps.append(f"device {t}* {n}" if dialect is METAL else f"{t}* {n}")
    if dialect is METAL:
        ps += [f"{t} {a}" for a, t in _METAL_BUILTINS if a in body]
    return ps


def metal_unit(kind, template, in_dtypes, out_dtypes, with_main=False) -> str:
    """Metal source as MLX would build it, prefixed by metal_stub.h (for g++)."""
    header, body = render(METAL, kind)
    inputs, outputs = io_names(kind, METAL)
    tparams = ", ".join(f"{_template_value(v, METAL_TYPES)[0]} {n}" for n, v in template)
    targs = ", ".join(_template_value(v, METAL_TYPES)[1] for n, v in template)
    params = _params(body, inputs, in_dtypes, outputs, out_dtypes, METAL_TYPES, METAL)
    src = ['#include "metal_stub.h"', header,
           f"template <{tparams}>",
           f"void kda_{kind}_kernel(\n    " + ",\n    ".join(params) + ") {",
           body, "}",
           f"template void kda_{kind}_kernel<{targs}>(" +
           ", ".join(p.rsplit(" ", 1)[0] for p in params) + ");"]
    if with_main:
        builtin_expr = {
            "simdgroup_index_in_threadgroup": "sg",
            "thread_index_in_simdgroup": "ln",
            "thread_index_in_threadgroup": "tid",
            "threadgroup_position_in_grid": "pos",
            "threadgroups_per_grid": "ngrid",
        }
        args = _emu_args(inputs, outputs, in_dtypes, out_dtypes, body, METAL_TYPES, "a_{}.shape.data()")
        args += [builtin_expr[a] for a, _ in _METAL_BUILTINS if a in body]
        src.append(_emu_main(inputs, outputs, ["nt"], [
            "  kda_emu::launch(gx, gy, gz, nt, [&](uint3 pos, uint3 ngrid, uint tid, uint sg, uint ln) {",
            "    (void)pos; (void)ngrid; (void)tid; (void)sg; (void)ln;",
            f"    kda_{kind}_kernel<{targs}>(" + ", ".join(args) + ");",
            "  });"]))
    return "\n".join(src)


def _emu_args(inputs, outputs, in_dtypes, out_dtypes, body, types, shape_expr) -> list[str]:
    """The kernel's arguments in the emulator's main(): the arrays read into a_<name>, and the
    <name>_shape of those the body mentions."""
    call = []
    for n in inputs:
        call.append(f"(const {types[in_dtypes[n]]}*)a_{n}.data.data()")
        if f"{n}_shape" in body:
            call.append(shape_expr.format(n))
    for n in outputs:
        call.append(f"({types[out_dtypes[n]]}*)a_{n}.data.data()")
    return call


def _emu_main(inputs, outputs, int_args, launch) -> str:
    """main(argv: dir gx gy gz <int_args>) of an emulator: reads <dir>/<name>.bin (int32 ndim,
    int32 dims, data) for each input and output, runs the `launch` lines, writes the outputs
    back (same layout)."""
    usage = " ".join(["dir gx gy gz", *int_args])
    lines = [r"""
struct EmuArray { std::vector<int> shape; std::vector<char> data; };
static EmuArray emu_read(const char* dir, const char* name) {
  char path[4096]; std::snprintf(path, sizeof path, "%s/%s.bin", dir, name);
  FILE* fp = std::fopen(path, "rb"); if (!fp) { std::perror(path); std::exit(2); }
  EmuArray a; int nd = 0; if (std::fread(&nd, 4, 1, fp) != 1) std::exit(3);
  a.shape.resize(nd); if (nd && std::fread(a.shape.data(), 4, nd, fp) != (size_t)nd) std::exit(3);
  long pos = std::ftell(fp); std::fseek(fp, 0, SEEK_END); long end = std::ftell(fp); std::fseek(fp, pos, SEEK_SET);
  a.data.resize(end - pos); if (end > pos && std::fread(a.data.data(), 1, end - pos, fp) != (size_t)(end - pos)) std::exit(3);
  std::fclose(fp); return a;
}
static void emu_write(const char* dir, const char* name, const EmuArray& a) {
  char path[4096]; std::snprintf(path, sizeof path, "%s/%s.bin", dir, name);
  FILE* fp = std::fopen(path, "wb"); int nd = (int)a.shape.size();
  std::fwrite(&nd, 4, 1, fp); std::fwrite(a.shape.data(), 4, nd, fp);
  std::fwrite(a.data.data(), 1, a.data.size(), fp); std::fclose(fp);
}
int main(int argc, char** argv) {""",
             f'  if (argc != {5 + len(int_args)}) {{ std::fprintf(stderr, "usage: {usage}\\n"); return 1; }}',
             r"""  const char* dir = argv[1];
  const unsigned gx = std::atoi(argv[2]), gy = std::atoi(argv[3]), gz = std::atoi(argv[4]);"""]
    lines += [f"  const long {a} = std::atol(argv[{5 + i}]);" for i, a in enumerate(int_args)]
    for n in inputs + outputs:
        lines.append(f'  EmuArray a_{n} = emu_read(dir, "{n}");')
    lines += launch
    for n in outputs:
        lines.append(f'  emu_write(dir, "{n}", a_{n});')
    lines.append("  return 0;\n}")
    return "\n".join(lines)


CUDA_SHIM = r"""
// Stand-in for what MLX's CUDA JIT prepends (mlx/backend/cuda/device/utils.cuh and
// cooperative_groups), enough to compile a custom kernel with nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <stdint.h>
#define MAX_NDIM 10
struct Shape { int32_t v[MAX_NDIM]; __device__ int32_t operator[](int i) const { return v[i]; } };
"""


def cuda_unit(kind, template, in_dtypes, out_dtypes, name="kda_kernel", prof=False,
              with_main=False) -> str:
    """CUDA source laid out as MLX's cuda_kernel builds it (for nvcc -arch=sm_90), or with
    with_main the CPU emulator of it (cuda_emu_unit)."""
    header, body = render(CUDA, kind, prof)
    inputs, outputs = io_names(kind, CUDA, prof)
    if with_main:
        return cuda_emu_unit(header, body, inputs, outputs, template, in_dtypes, out_dtypes, name)
    params = _params(body, inputs, in_dtypes, outputs, out_dtypes, CUDA_TYPES, CUDA)
    return "\n".join([CUDA_SHIM, header, "namespace mlx::core::cu {",
                      "namespace cg = cooperative_groups;",
                      f'extern "C" __global__ void {name}(\n    ' + ",\n    ".join(params) + ") {",
                      *_cuda_consts(template), body, "}", "}  // namespace mlx::core::cu"])


def _cuda_consts(template) -> list[str]:
    """MLX's CUDA wrapper: template arguments become constants at the top of the kernel."""
    consts = []
    for n, v in template:
        if isinstance(v, bool):
            consts.append(f"  constexpr bool {n} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            consts.append(f"  constexpr int {n} = {v};")
        else:
            consts.append(f"  using {n} = {CUDA_TYPES[v]};")
    return consts


def cuda_emu_unit(header, body, inputs, outputs, template, in_dtypes, out_dtypes, name="kda_kernel") -> str:
    """A CUDA kernel (header, body, MLX's wrapper) for g++ against cuda_stub.h, with a main()
    that emulates one launch (argv: dir gx gy gz nt smem_bytes; the grid in blocks)."""
    # __shared__ is empty in the stub (it also follows `extern`): SHARED_ARR is redefined below,
    # and any other use would silently be a per-thread array
    rest = (header + body).replace("extern __shared__", "").replace("SHARED_ARR(T, name, N) __shared__", "")
    if "__shared__" in rest:
        raise ValueError("cuda_emu_unit: a __shared__ array outside SHARED_ARR; teach cuda_stub.h about it")
    params = _params(body, inputs, in_dtypes, outputs, out_dtypes, CUDA_TYPES, CUDA)
    args = _emu_args(inputs, outputs, in_dtypes, out_dtypes, body, CUDA_TYPES, "kda_emu_shape(a_{}.shape)")
    return "\n".join([
        '#include "cuda_stub.h"', header,
        "#undef SHARED_ARR",
        "#define SHARED_ARR(T, name, N) KDA_CUDA_SHARED_ARR(T, name, N)",
        f"__global__ void {name}(\n    " + ",\n    ".join(params) + ") {",
        *_cuda_consts(template), body, "}",
        "static Shape kda_emu_shape(const std::vector<int>& s) {",
        "  Shape r{}; for (size_t i = 0; i < s.size() && i < MAX_NDIM; ++i) r.v[i] = s[i]; return r;",
        "}",
        _emu_main(inputs, outputs, ["nt", "smem_bytes"], [
            "  kda_cuda::launch(dim3{gx, gy, gz}, (int)nt, (size_t)smem_bytes, [&]() {",
            f"    {name}(" + ", ".join(args) + ");",
            "  });"])])
