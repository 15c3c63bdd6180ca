// Makes the op library importable as the Python module sit_ext._C. Importing it
// runs the static TORCH_LIBRARY registrations. The module holds one thing: a
// direct call of an op, for the Python wrappers' eager path.
//
// Why: a call through torch.ops matches its arguments against the schema in
// Python-facing C++ (pybind args, overload checks, a GIL release per call),
// which at small sizes costs more than the kernel. _C.call(handle, *args) puts
// plain arguments on the boxed stack and calls the dispatcher, which still
// runs every dispatch key (autograd, autocast, fake and functorch modes). The
// wrappers use it only for plain tensors outside torch.compile and
// __torch_function__ modes; everything else goes through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>

namespace {

constexpr const char* kCapsule = "sit_ext.op_handle";

// _C.handle(name) -> a capsule holding the op's dispatcher handle.
PyObject* handle(PyObject*, PyObject* name) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyUnicode_Check(name), "sit_ext._C.handle: expected an op name");
  const std::string op(PyUnicode_AsUTF8(name));
  TORCH_CHECK_VALUE(op.rfind("sit_ext::", 0) == 0, "sit_ext._C.handle: not a sit_ext op: ", op);
  auto* h = new c10::OperatorHandle(c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), ""));
  return PyCapsule_New(h, kCapsule, [](PyObject* capsule) {
    delete static_cast<c10::OperatorHandle*>(PyCapsule_GetPointer(capsule, kCapsule));
  });
  END_HANDLE_TH_ERRORS
}

c10::IValue to_ivalue(PyObject* obj, size_t index) {
  if (THPVariable_Check(obj)) return THPVariable_Unpack(obj);
  if (obj == Py_None) return {};
  if (PyBool_Check(obj)) return obj == Py_True;
  if (PyLong_Check(obj)) return static_cast<int64_t>(PyLong_AsLongLong(obj));
  if (PyFloat_Check(obj)) return PyFloat_AS_DOUBLE(obj);
  if (THPDtype_Check(obj)) return reinterpret_cast<THPDtype*>(obj)->scalar_type;
  if (PyList_Check(obj)) {  // bool[N] masks
    c10::List<bool> bools;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(obj); ++i) {
      PyObject* item = PyList_GET_ITEM(obj, i);
      TORCH_CHECK_TYPE(PyBool_Check(item), "sit_ext._C.call: argument ", index,
                       ": expected a list of bools");
      bools.push_back(item == Py_True);
    }
    return bools;
  }
  TORCH_CHECK_TYPE(false, "sit_ext._C.call: argument ", index, ": unsupported type ",
                   Py_TYPE(obj)->tp_name);
}

// _C.call(handle, *args): the op's outputs, a tensor or a tuple of tensors.
PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs >= 1 && PyCapsule_IsValid(args[0], kCapsule),
                   "sit_ext._C.call: expected an op handle first");
  const auto& op = *static_cast<c10::OperatorHandle*>(PyCapsule_GetPointer(args[0], kCapsule));
  const auto& schema = op.schema();
  // Every argument is positional and none is defaulted: the boxed kernel reads
  // exactly this many from the stack.
  TORCH_CHECK_VALUE(static_cast<size_t>(nargs - 1) == schema.arguments().size(),
                    "sit_ext._C.call: ", schema.name(), " takes ", schema.arguments().size(),
                    " arguments, got ", nargs - 1);
  torch::jit::Stack stack;
  stack.reserve(nargs - 1);
  for (Py_ssize_t i = 1; i < nargs; ++i) stack.push_back(to_ivalue(args[i], i - 1));
  {
    pybind11::gil_scoped_release no_gil;
    op.callBoxed(&stack);
  }
  if (stack.size() == 1) return THPVariable_Wrap(std::move(stack[0]).toTensor());
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < stack.size(); ++i) {
    PyTuple_SET_ITEM(out, i, THPVariable_Wrap(std::move(stack[i]).toTensor()));
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"handle", handle, METH_O, "handle(name): the dispatcher handle of a sit_ext op"},
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL,
     "call(handle, *args): calls the op through the dispatcher with plain arguments"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
