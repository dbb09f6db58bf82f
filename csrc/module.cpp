// The Python module llavamed_fast._C. Importing it loads this shared library, whose static
// TORCH_LIBRARY_FRAGMENT blocks register every op in csrc/ with the dispatcher; the ops are then
// called through torch.ops.llavamed_fast.*. No pybind11: the plain (limited) C API keeps the compile
// short and lets one build serve every CPython >= 3.10 (abi3).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

#ifdef LLAVAMED_FAST_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Registers the llavamed_fast C++/CUDA ops (torch.ops.llavamed_fast.*). Import torch first.",
    0,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddObjectRef(module, "built_with_cuda", kBuiltWithCuda ? Py_True : Py_False) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
