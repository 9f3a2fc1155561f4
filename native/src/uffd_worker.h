// N-API surface of the userfaultfd page server: one AsyncWorker per blocking operation, no policy.
#pragma once

#include <napi.h>

namespace thaw::uffd {

// Adds listen, accept, receive, fill, hashFile, createCancel, cancel and close to `exports`.
void RegisterUffdExports(Napi::Env env, Napi::Object exports);

}  // namespace thaw::uffd
