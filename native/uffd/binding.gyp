# The userfaultfd page server as its own addon (build: npx node-gyp -C native/uffd rebuild --nodedir=/usr).
# Its sources live in native/src with the I/O addon's; RegisterUffdExports can move into that addon later.
{
  "targets": [
    {
      "target_name": "thaw_uffd",
      "sources": ["../src/uffd.cc", "../src/uffd_worker.cc", "../src/unix_socket.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED", "THAW_UFFD_STANDALONE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "libraries": ["-lpthread"]
    }
  ]
}
