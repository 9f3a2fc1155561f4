// N-API argument and error helpers shared by the page-server and console addons.
#pragma once

#include <napi.h>
#include <string.h>

#include <string>

namespace thaw {

// An Error with the failed step (`op`) and errno as properties, for the TypeScript facades.
inline Napi::Error OpError(Napi::Env env, const std::string& op, int err, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Value().Set("op", Napi::String::New(env, op));
  e.Value().Set("errno", Napi::Number::New(env, err));
  return e;
}

inline Napi::Error ErrnoError(Napi::Env env, const std::string& op, int err) {
  return OpError(env, op, err, op + " failed: " + strerror(err));
}

inline int IntArg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  return info[i].As<Napi::Number>().Int32Value();
}

}  // namespace thaw
