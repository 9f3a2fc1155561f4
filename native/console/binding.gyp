# The console-socket addon (build: npx node-gyp -C native/console rebuild --nodedir=/usr; scripts/build-native.sh
# does it): receives a pty master sent over a unix socket (runsc/runc --console-socket) and sets window sizes.
{
  "targets": [
    {
      "target_name": "thaw_console",
      "sources": ["src/console.cc", "../src/unix_socket.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    }
  ]
}
