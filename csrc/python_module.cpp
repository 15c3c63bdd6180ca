// Makes the op library importable as the Python module sit_ext._C. Importing it
// runs the static TORCH_LIBRARY registrations; the module itself is empty.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
