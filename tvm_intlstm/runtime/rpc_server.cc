/*
 * tvm_intlstm RPC server: a TVM RPC server (the protocol of `python -m tvm.exec.rpc_server`)
 * written against the TVM runtime's C API only, so that it runs where no Python TVM exists,
 * e.g. under qemu-aarch64 with the aarch64 libtvm_runtime.so of the PyPI wheel.
 *
 * Shipped with tvm_intlstm (package data) and cross-compiled by tvm_intlstm/runtime/rpc.py
 * (`ensure_rpc_server`); build it natively on a board like the runner (docs/arm.md).
 *
 * Usage: tvm_intlstm_rpc_server [--host H] [--port P] [--key K] [--work-dir D]
 *                               [--max-sessions N]
 *   --port 0 picks a free port.  Prints "listening: H:P" on stdout once it accepts
 *   connections.  One session at a time, each in a forked child with its own temporary work
 *   directory (uploads land there and are removed afterwards); a session that crashes
 *   (e.g. SIGILL) ends only that session.  --max-sessions N exits after N sessions.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int32_t kRPCMagic = 0xff271;
constexpr int32_t kRPCSuccess = kRPCMagic;
constexpr int32_t kRPCMismatch = kRPCMagic + 2;

std::string g_session_dir;
volatile pid_t g_child = 0;

// SIGTERM/SIGINT in the server: end the running session too (and reap it), then exit.
extern "C" void OnTerminate(int) {
  pid_t child = g_child;
  if (child > 0) {
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
  }
  _exit(0);
}

void Log(const std::string& msg) {
  std::cerr << "tvm_intlstm_rpc_server: " << msg << std::endl;
}

bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

std::string WorkPath(const std::string& name) { return g_session_dir + "/" + name; }

void RegisterServerEnv() {
  // the RPC runtime's upload/download/remove resolve names through this function
  ffi::Function::SetGlobal("tvm.rpc.server.workpath",
                           ffi::Function::FromTyped([](std::string name) -> std::string {
                             return WorkPath(name);
                           }),
                           true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module",
                           ffi::Function::FromTyped([](std::string name) -> ffi::Module {
                             std::string path = WorkPath(name);
                             Log("load_module " + path);
                             return ffi::Module::LoadFromFile(path);
                           }),
                           true);
}

// Handshake of tvm/rpc/server.py: [magic, keylen, "client:<key> [-timeout=T]"] ->
// [success, keylen, "server:<key>"].  Returns false (connection closed) on a mismatch.
bool Handshake(int fd, const std::string& key, double* timeout) {
  int32_t magic = 0, keylen = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kRPCMagic) return false;
  if (!RecvAll(fd, &keylen, 4) || keylen < 0 || keylen > 4096) return false;
  std::string client_key(static_cast<size_t>(keylen), '\0');
  if (keylen && !RecvAll(fd, &client_key[0], static_cast<size_t>(keylen))) return false;
  std::istringstream is(client_key);
  std::string head, opt;
  is >> head;
  if (head != "client:" + key) {
    int32_t code = kRPCMismatch;
    SendAll(fd, &code, 4);
    Log("key mismatch: got '" + head + "', expected 'client:" + key + "'");
    return false;
  }
  while (is >> opt) {
    if (opt.rfind("-timeout=", 0) == 0) *timeout = std::atof(opt.c_str() + 9);
  }
  std::string server_key = "server:" + key;
  int32_t code = kRPCSuccess;
  int32_t len = static_cast<int32_t>(server_key.size());
  return SendAll(fd, &code, 4) && SendAll(fd, &len, 4) &&
         SendAll(fd, server_key.data(), server_key.size());
}

[[noreturn]] void ServeSession(int fd, double timeout) {
  if (timeout > 0) alarm(static_cast<unsigned>(std::ceil(timeout)));
  int rc = 0;
  try {
    if (chdir(g_session_dir.c_str()) != 0) Log("cannot chdir to " + g_session_dir);
    RegisterServerEnv();
    ffi::Function loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");
    loop(static_cast<int64_t>(fd));  // returns when the client closes the session
  } catch (const std::exception& e) {
    Log(std::string("session error: ") + e.what());
    rc = 1;
  }
  std::cout.flush();
  std::cerr.flush();
  _exit(rc);
}

std::string Describe(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = strsignal(sig);
    return "killed by signal " + std::to_string(sig) + " (" + (name ? name : "?") + ")" +
           (sig == SIGILL ? ": illegal instruction (e.g. sdot on a CPU without dotprod)" : "");
  }
  return "status " + std::to_string(status);
}

int Run(int argc, char** argv) {
  std::string host = "127.0.0.1", key, work_dir = "/tmp";
  int port = 9090;
  long max_sessions = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "tvm_intlstm_rpc_server: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--host") host = value();
    else if (a == "--port") port = std::atoi(value().c_str());
    else if (a == "--key") key = value();
    else if (a == "--work-dir") work_dir = value();
    else if (a == "--max-sessions") max_sessions = std::atol(value().c_str());
    else if (a == "-h" || a == "--help") {
      std::cout << "usage: tvm_intlstm_rpc_server [--host H] [--port P] [--key K] "
                   "[--work-dir D] [--max-sessions N]\n";
      return 0;
    } else {
      std::cerr << "tvm_intlstm_rpc_server: unknown argument " << a << "\n";
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGTERM, OnTerminate);
  signal(SIGINT, OnTerminate);

  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int gai = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (gai != 0) {
    Log("cannot resolve " + host + ": " + gai_strerror(gai));
    return 1;
  }
  int lfd = socket(res->ai_family, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (lfd < 0 || bind(lfd, res->ai_addr, res->ai_addrlen) != 0 || listen(lfd, 8) != 0) {
    Log("cannot listen on " + host + ":" + std::to_string(port) + ": " + std::strerror(errno));
    return 1;
  }
  freeaddrinfo(res);
  sockaddr_storage bound{};
  socklen_t blen = sizeof(bound);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&bound), &blen);
  int real_port = ntohs(bound.ss_family == AF_INET6
                            ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  // make sure the runtime (and its RPC functions) is loaded before announcing
  if (!ffi::Function::GetGlobal("rpc.ServerLoop").has_value()) {
    Log("libtvm_runtime has no rpc.ServerLoop (built without RPC?)");
    return 1;
  }
  std::cout << "listening: " << host << ":" << real_port << std::endl;

  for (long n = 0; max_sessions <= 0 || n < max_sessions;) {
    sockaddr_storage peer{};
    socklen_t plen = sizeof(peer);
    int fd = accept(lfd, reinterpret_cast<sockaddr*>(&peer), &plen);
    if (fd < 0) {
      if (errno == EINTR) continue;
      Log(std::string("accept failed: ") + std::strerror(errno));
      return 1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    double timeout = 0;
    if (!Handshake(fd, key, &timeout)) {
      close(fd);
      continue;
    }
    ++n;
    std::string tmpl = work_dir + "/tvm_intlstm_rpc_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) == nullptr) {
      Log("cannot create a work directory under " + work_dir + ": " + std::strerror(errno));
      close(fd);
      return 1;
    }
    g_session_dir = buf.data();
    Log("session " + std::to_string(n) + " started in " + g_session_dir);
    std::cout.flush();
    pid_t pid = fork();
    if (pid == 0) {
      signal(SIGTERM, SIG_DFL);
      signal(SIGINT, SIG_DFL);
      close(lfd);
      ServeSession(fd, timeout);
    }
    g_child = pid;
    close(fd);
    int status = 0;
    if (pid < 0) {
      Log(std::string("fork failed: ") + std::strerror(errno));
    } else {
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      g_child = 0;
      Log("session " + std::to_string(n) + " ended: " + Describe(status));
    }
    std::error_code ec;
    std::filesystem::remove_all(g_session_dir, ec);
  }
  close(lfd);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "tvm_intlstm_rpc_server: error: " << e.what() << std::endl;
    return 1;
  }
}
