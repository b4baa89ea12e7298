/*
 * tvm_intlstm runner: load a Relax VM module exported by tvm_intlstm (a .so made with
 * `export_library`), feed it input tensors read from .npy files, call one of its functions
 * and write every output tensor back as a .npy file.  Optionally times repeated calls.
 *
 * It has no Python dependency: it only needs the TVM runtime (libtvm_runtime.so) and TVM FFI
 * (libtvm_ffi.so) shared libraries of the same release the module was compiled with, plus the
 * tvm_ffi headers (the TVM wheel's own tvm/include is incomplete and is not needed).
 * The same file serves two purposes:
 *   - tvm_intlstm.runtime.emulate cross-builds it for aarch64 against the PyPI aarch64 wheels
 *     and runs it under qemu-aarch64 (tests, CI);
 *   - examples/deploy_arm/Makefile builds it for (or on) a real ARM board.
 *
 * Build (native):
 *   g++ -std=c++17 -O2 runner.cc -o tvm_intlstm_runner \
 *       -I<tvm_ffi>/include -I<tvm_ffi>/3rdparty/dlpack/include \
 *       -L<dir of libtvm_runtime.so> -L<dir of libtvm_ffi.so> \
 *       -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed -ldl -lpthread
 * (`--no-as-needed` matters: nothing in this file references libtvm_runtime directly, but the
 * Relax VM loader and the CPU thread pool live there and must be loaded.)
 *
 * Usage:
 *   tvm_intlstm_runner [options] MODULE.so [INPUT.npy ...]
 *     -o, --output-dir DIR   write outputs to DIR/output_<i>.npy (default: current directory;
 *                            created if missing)
 *     -f, --function NAME    Relax function to call (default: main)
 *     -r, --repeat N         after the first call, time N more calls and print the median
 *     -q, --quiet            print only the timing lines
 *     -h, --help
 *
 * Standard output (one "key: value" per line, machine readable):
 *   num_outputs: K
 *   output_<i>: <dtype> <shape> <path>
 *   median_us: <float>   min_us: <float>   mean_us: <float>   repeat: N   (only with --repeat)
 * A function returning a tuple (possibly nested) yields its tensors flattened in order; an
 * integer or float scalar in the result is written as a 0-d int64/float64 array.
 * Exit status: 0 success, 1 runtime error (message on stderr), 2 usage error.
 *
 * NPY support: format versions 1.0/2.0/3.0 on read, 1.0 on write; little-endian,
 * C order only; dtypes bool, int8/16/32/64, uint8/16/32/64, float16/32/64.
 */
#include <dlpack/dlpack.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// ------------------------------------------------------------------------------------------
// Minimal NPY reader / writer
// ------------------------------------------------------------------------------------------

struct DTypeEntry {
  const char* descr;  // numpy descr without the byte-order character
  DLDataType dtype;
  const char* name;
};

const DTypeEntry kDTypes[] = {
    {"b1", {kDLBool, 8, 1}, "bool"},      {"i1", {kDLInt, 8, 1}, "int8"},
    {"i2", {kDLInt, 16, 1}, "int16"},     {"i4", {kDLInt, 32, 1}, "int32"},
    {"i8", {kDLInt, 64, 1}, "int64"},     {"u1", {kDLUInt, 8, 1}, "uint8"},
    {"u2", {kDLUInt, 16, 1}, "uint16"},   {"u4", {kDLUInt, 32, 1}, "uint32"},
    {"u8", {kDLUInt, 64, 1}, "uint64"},   {"f2", {kDLFloat, 16, 1}, "float16"},
    {"f4", {kDLFloat, 32, 1}, "float32"}, {"f8", {kDLFloat, 64, 1}, "float64"},
};

bool SameDType(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

const DTypeEntry* FindDType(DLDataType dtype) {
  for (const auto& e : kDTypes) {
    if (SameDType(e.dtype, dtype)) return &e;
  }
  return nullptr;
}

std::string DTypeName(DLDataType dtype) {
  const DTypeEntry* e = FindDType(dtype);
  if (e) return e->name;
  std::ostringstream os;
  os << "dtype(code=" << int(dtype.code) << ",bits=" << int(dtype.bits)
     << ",lanes=" << dtype.lanes << ")";
  return os.str();
}

[[noreturn]] void Fail(const std::string& msg) { throw std::runtime_error(msg); }

// mkdir -p
void MakeDirs(const std::string& path) {
  if (path.empty()) return;
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos == path.size() || path[pos] == '/') {
      std::string prefix = path.substr(0, pos);
      struct stat st;
      if (stat(prefix.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode)) Fail(prefix + " exists and is not a directory");
      } else if (mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
        Fail("cannot create output directory " + prefix + ": " + std::strerror(errno));
      }
    }
  }
}

// Extract the value that follows 'key': in a Python dict literal (the NPY header).
std::string HeaderField(const std::string& header, const std::string& key,
                        const std::string& path) {
  std::string quoted = "'" + key + "'";
  size_t pos = header.find(quoted);
  if (pos == std::string::npos) Fail(path + ": NPY header has no " + quoted + " field");
  pos = header.find(':', pos + quoted.size());
  if (pos == std::string::npos) Fail(path + ": malformed NPY header");
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  size_t end;
  if (header[pos] == '\'') {
    end = header.find('\'', pos + 1);
    if (end == std::string::npos) Fail(path + ": malformed NPY header");
    return header.substr(pos + 1, end - pos - 1);
  }
  if (header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) Fail(path + ": malformed NPY header");
    return header.substr(pos, end - pos + 1);
  }
  end = header.find_first_of(",}", pos);
  return header.substr(pos, end - pos);
}

struct CPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = std::max<size_t>(ffi::GetDataSize(*tensor), 1);
    size = (size + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
    tensor->data = std::aligned_alloc(64, size);
    if (tensor->data == nullptr) Fail("out of memory allocating an input tensor");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot open input file " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(path + ": not an NPY file");
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    Fail(path + ": unsupported NPY version " + std::to_string(major));
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) Fail(path + ": truncated NPY header");

  std::string descr = HeaderField(header, "descr", path);
  std::string fortran = HeaderField(header, "fortran_order", path);
  std::string shape_str = HeaderField(header, "shape", path);
  if (fortran.find("True") != std::string::npos) {
    Fail(path + ": Fortran-order arrays are not supported (use numpy.ascontiguousarray)");
  }
  if (descr.size() < 2) Fail(path + ": bad dtype descr '" + descr + "'");
  char order = descr[0];
  std::string code = descr.substr(1);
  if (order == '>' && code != "i1" && code != "u1" && code != "b1") {
    Fail(path + ": big-endian arrays are not supported");
  }
  const DTypeEntry* entry = nullptr;
  for (const auto& e : kDTypes) {
    if (code == e.descr) entry = &e;
  }
  if (entry == nullptr) Fail(path + ": unsupported dtype '" + descr + "'");

  std::vector<int64_t> shape;
  {
    std::string s = shape_str.substr(1, shape_str.size() - 2);  // strip parentheses
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
      size_t b = item.find_first_not_of(" \t");
      if (b == std::string::npos) continue;
      shape.push_back(std::stoll(item.substr(b)));
    }
  }
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(
      CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), entry->dtype, cpu);
  size_t nbytes = ffi::GetDataSize(t.numel(), entry->dtype);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) {
    Fail(path + ": truncated data (expected " + std::to_string(nbytes) + " bytes)");
  }
  return t;
}

void WriteNpyRaw(const std::string& path, const char* descr, const std::vector<int64_t>& shape,
                 const void* data, size_t nbytes) {
  std::ostringstream h;
  h << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    h << shape[i];
    if (shape.size() == 1 || i + 1 < shape.size()) h << ",";
    if (i + 1 < shape.size()) h << " ";
  }
  h << "), }";
  std::string header = h.str();
  // magic(6) + version(2) + len(2) + header + '\n' must be a multiple of 64
  size_t total = 10 + header.size() + 1;
  size_t pad = (64 - total % 64) % 64;
  header.append(pad, ' ');
  header.push_back('\n');
  if (header.size() > 65535) Fail("NPY header too long for " + path);
  std::ofstream out(path, std::ios::binary);
  if (!out) Fail("cannot write output file " + path);
  out.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>((header.size() >> 8) & 0xff)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) Fail("error writing " + path);
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) os << ",";
    os << shape[i];
  }
  os << ")";
  return os.str();
}

// ------------------------------------------------------------------------------------------
// Output handling
// ------------------------------------------------------------------------------------------

struct OutputWriter {
  std::string dir;
  bool quiet = false;
  int count = 0;

  std::string NextPath() { return dir + "/output_" + std::to_string(count) + ".npy"; }

  void Report(const std::string& dtype, const std::vector<int64_t>& shape,
              const std::string& path) {
    if (!quiet) {
      std::cout << "output_" << count << ": " << dtype << " " << ShapeString(shape) << " "
                << path << "\n";
    }
    ++count;
  }

  void WriteTensor(const ffi::Tensor& t) {
    const DLTensor* dl = t.GetDLTensorPtr();
    if (dl->device.device_type != kDLCPU) Fail("output tensor is not on the CPU");
    const DTypeEntry* entry = FindDType(dl->dtype);
    if (entry == nullptr) Fail("unsupported output dtype " + DTypeName(dl->dtype));
    if (!t.IsContiguous()) Fail("non-contiguous output tensor");
    std::vector<int64_t> shape(dl->shape, dl->shape + dl->ndim);
    std::string descr = std::string(entry->dtype.bits == 8 ? "|" : "<") + entry->descr;
    const char* data = static_cast<const char*>(dl->data) + dl->byte_offset;
    std::string path = NextPath();
    WriteNpyRaw(path, descr.c_str(), shape, data, ffi::GetDataSize(t.numel(), dl->dtype));
    Report(entry->name, shape, path);
  }

  void Write(const ffi::Any& value) {
    if (auto t = value.try_cast<ffi::Tensor>()) {
      WriteTensor(*t);
    } else if (auto arr = value.try_cast<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& item : *arr) Write(item);
    } else if (value.type_index() == ffi::TypeIndex::kTVMFFIInt ||
               value.type_index() == ffi::TypeIndex::kTVMFFIBool) {
      int64_t v = value.cast<int64_t>();
      std::string path = NextPath();
      WriteNpyRaw(path, "<i8", {}, &v, sizeof(v));
      Report("int64", {}, path);
    } else if (value.type_index() == ffi::TypeIndex::kTVMFFIFloat) {
      double v = value.cast<double>();
      std::string path = NextPath();
      WriteNpyRaw(path, "<f8", {}, &v, sizeof(v));
      Report("float64", {}, path);
    } else if (value.type_index() == ffi::TypeIndex::kTVMFFINone) {
      // nothing to write
    } else {
      Fail("unsupported value in the function's result: " + value.GetTypeKey());
    }
  }
};

void Usage(std::ostream& os) {
  os << "usage: tvm_intlstm_runner [-o DIR] [-f FUNC] [-r N] [-q] MODULE.so [INPUT.npy ...]\n"
        "  -o, --output-dir DIR  write outputs to DIR/output_<i>.npy (default .)\n"
        "  -f, --function NAME   Relax function to call (default main)\n"
        "  -r, --repeat N        time N further calls, print median_us/min_us/mean_us\n"
        "  -q, --quiet           print only timing lines\n";
}

int Run(int argc, char** argv) {
  std::string out_dir = ".";
  std::string func_name = "main";
  long repeat = 0;
  bool quiet = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto need_value = [&](const std::string& opt) -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "tvm_intlstm_runner: " << opt << " needs a value\n";
        Usage(std::cerr);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "-o" || a == "--output-dir") {
      out_dir = need_value(a);
    } else if (a == "-f" || a == "--function") {
      func_name = need_value(a);
    } else if (a == "-r" || a == "--repeat") {
      std::string v = need_value(a);
      char* end = nullptr;
      repeat = std::strtol(v.c_str(), &end, 10);
      if (*end != '\0' || repeat < 0) {
        std::cerr << "tvm_intlstm_runner: bad --repeat value '" << v << "'\n";
        return 2;
      }
    } else if (a == "-q" || a == "--quiet") {
      quiet = true;
    } else if (a == "-h" || a == "--help") {
      Usage(std::cout);
      return 0;
    } else if (a.size() > 1 && a[0] == '-') {
      std::cerr << "tvm_intlstm_runner: unknown option " << a << "\n";
      Usage(std::cerr);
      return 2;
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty()) {
    Usage(std::cerr);
    return 2;
  }

  // dlopen() searches the library path for a name without a slash: make it explicit.
  std::string lib_path = positional[0];
  if (lib_path.find('/') == std::string::npos) lib_path = "./" + lib_path;
  {
    std::ifstream probe(lib_path, std::ios::binary);
    if (!probe) Fail("cannot open module file " + lib_path);
  }
  std::vector<ffi::Tensor> inputs;
  for (size_t i = 1; i < positional.size(); ++i) inputs.push_back(ReadNpy(positional[i]));

  ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable", true);
  if (!load_exec.has_value()) {
    Fail(lib_path + " is not a Relax VM module (no vm_load_executable); export the result of "
                    "tvm.compile on a Relax IRModule");
  }
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  ffi::Function init = vm->GetFunction("vm_initialization", false).value();
  // device type, device id, allocator (2 = pooled); the CPU is also the host device.
  init(static_cast<int>(kDLCPU), 0, 2);
  ffi::Optional<ffi::Function> maybe_func = vm->GetFunction(func_name, false);
  if (!maybe_func.has_value()) Fail("the module has no Relax function named '" + func_name + "'");
  ffi::Function func = *maybe_func;

  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  func.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);

  MakeDirs(out_dir);
  OutputWriter writer;
  writer.dir = out_dir;
  writer.quiet = quiet;
  writer.Write(result);
  if (!quiet) std::cout << "num_outputs: " << writer.count << "\n";

  if (repeat > 0) {
    std::vector<double> us;
    us.reserve(repeat);
    for (long r = 0; r < repeat; ++r) {
      ffi::Any res;
      auto t0 = std::chrono::steady_clock::now();
      func.CallPacked(args.data(), static_cast<int32_t>(args.size()), &res);
      auto t1 = std::chrono::steady_clock::now();
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::vector<double> sorted = us;
    std::sort(sorted.begin(), sorted.end());
    size_t n = sorted.size();
    double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    double mean = 0;
    for (double v : us) mean += v;
    mean /= static_cast<double>(n);
    std::cout << "repeat: " << repeat << "\n";
    std::cout << "median_us: " << median << "\n";
    std::cout << "min_us: " << sorted.front() << "\n";
    std::cout << "mean_us: " << mean << "\n";
  }
  std::cout.flush();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const ffi::Error& e) {
    std::cerr << "tvm_intlstm_runner: TVM error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tvm_intlstm_runner: error: " << e.what() << std::endl;
    return 1;
  }
}
