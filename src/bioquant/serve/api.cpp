#include "bioquant/serve/api.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace bioquant::serve {

using nlohmann::json;

ApiError bad_request(const std::string& message, const std::string& param) {
  return ApiError(400, "invalid_request_error", message, param);
}

json error_json(const ApiError& e) {
  return {{"error",
           {{"message", e.what()},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

namespace {

struct TooDeep {};

// An integer JSON value (signed or unsigned storage) within [min, max].
bool in_range(const json& v, int64_t min, int64_t max) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    return u <= static_cast<uint64_t>(max) && (min <= 0 || u >= static_cast<uint64_t>(min));
  }
  const int64_t i = v.get<int64_t>();
  return i >= min && i <= max;
}

const char* type_name(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    default: return "a value";
  }
}

}  // namespace

json parse_body(const std::string& body, const ApiLimits& limits) {
  if (body.empty()) throw bad_request("the request body is empty (expected a JSON object)");
  json j;
  try {
    // The callback sees every value with its depth: refuse deep nesting before it is built.
    j = json::parse(body, [&](int depth, json::parse_event_t, json&) {
      if (depth > limits.max_depth) throw TooDeep{};
      return true;
    });
  } catch (const TooDeep&) {
    throw bad_request("the request body is nested more than " + std::to_string(limits.max_depth) + " levels deep");
  } catch (const json::parse_error& e) {
    // The position only: the parser's own message quotes the input, which is content.
    throw bad_request("the request body is not valid JSON (error at byte " + std::to_string(e.byte) + ")");
  } catch (const json::exception&) {
    throw bad_request("the request body is not valid JSON");
  }
  if (!j.is_object()) throw bad_request(std::string("the request body must be a JSON object, not ") + type_name(j));
  return j;
}

// ---------------------------------------------------------------------------------------------
// ObjectReader

ObjectReader::ObjectReader(const json& object, std::string where) : object_(object), where_(std::move(where)) {
  if (!object_.is_object()) throw bad_request(where_ + " must be a JSON object, not " + type_name(object_));
}

std::string ObjectReader::name(const std::string& key) const {
  return where_ == "request body" ? key : where_ + "." + key;
}

const json* ObjectReader::get(const std::string& key) {
  used_.push_back(key);
  const auto it = object_.find(key);
  if (it == object_.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<std::string> ObjectReader::string(const std::string& key, size_t max_bytes, bool required) {
  const json* v = get(key);
  if (!v) {
    if (required) throw bad_request("\"" + name(key) + "\" is required", name(key));
    return std::nullopt;
  }
  if (!v->is_string()) throw bad_request("\"" + name(key) + "\" must be a string, not " + type_name(*v), name(key));
  const auto& s = v->get_ref<const std::string&>();
  if (s.size() > max_bytes)
    throw bad_request("\"" + name(key) + "\" is longer than " + std::to_string(max_bytes) + " bytes", name(key));
  return s;
}

std::optional<int64_t> ObjectReader::integer(const std::string& key, int64_t min, int64_t max) {
  const json* v = get(key);
  if (!v) return std::nullopt;
  const std::string range = " between " + std::to_string(min) + " and " + std::to_string(max);
  if (!v->is_number_integer()) throw bad_request("\"" + name(key) + "\" must be an integer" + range, name(key));
  if (!in_range(*v, min, max)) throw bad_request("\"" + name(key) + "\" must be" + range, name(key));
  return v->get<int64_t>();
}

std::optional<double> ObjectReader::number(const std::string& key, double min, double max) {
  const json* v = get(key);
  if (!v) return std::nullopt;
  if (!v->is_number()) throw bad_request("\"" + name(key) + "\" must be a number, not " + type_name(*v), name(key));
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < min || d > max) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " must be between %g and %g", min, max);
    throw bad_request("\"" + name(key) + "\"" + buf, name(key));
  }
  return d;
}

std::optional<bool> ObjectReader::boolean(const std::string& key) {
  const json* v = get(key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) throw bad_request("\"" + name(key) + "\" must be true or false, not " + type_name(*v), name(key));
  return v->get<bool>();
}

void ObjectReader::only(const std::string& key, const json& accepted, const std::string& why) {
  const json* v = get(key);
  if (v && *v != accepted) throw bad_request("\"" + name(key) + "\": " + why, name(key));
}

void ObjectReader::done() const {
  for (auto it = object_.begin(); it != object_.end(); ++it) {
    if (std::find(used_.begin(), used_.end(), it.key()) == used_.end()) {
      std::string key = it.key();
      if (key.size() > 64) key = key.substr(0, 64) + "...";
      throw bad_request("unknown field \"" + (where_ == "request body" ? key : where_ + "." + key) + "\"", key);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The generation endpoints.

namespace {

constexpr size_t kMaxModelName = 256;

void read_stop(ObjectReader& r, const ApiLimits& limits, SamplingParams& p) {
  const json* stop = r.get("stop");
  if (!stop) return;
  auto add = [&](const json& s) {
    if (!s.is_string() || s.get_ref<const std::string&>().empty())
      throw bad_request("\"stop\" must be a non-empty string or an array of them", "stop");
    if (s.get_ref<const std::string&>().size() > limits.max_stop_bytes)
      throw bad_request("a stop string is longer than " + std::to_string(limits.max_stop_bytes) + " bytes", "stop");
    p.stop.push_back(s.get<std::string>());
  };
  if (stop->is_array()) {
    if (stop->size() > limits.max_stop)
      throw bad_request("at most " + std::to_string(limits.max_stop) + " stop strings are allowed", "stop");
    for (const json& s : *stop) add(s);
  } else {
    add(*stop);
  }
}

// The fields both endpoints share (max_tokens is read by the caller: chat also has
// max_completion_tokens).
void read_common(ObjectReader& r, const ApiLimits& limits, SamplingParams& p) {
  if (auto t = r.number("temperature", 0.0, 2.0)) p.temperature = static_cast<float>(*t);
  if (auto t = r.number("top_p", 0.0, 1.0)) {
    if (*t <= 0.0) throw bad_request("\"top_p\" must be greater than 0", "top_p");
    p.top_p = static_cast<float>(*t);
  }
  if (auto k = r.integer("top_k", -1, 1000000)) p.top_k = *k < 0 ? 0 : static_cast<int>(*k);
  if (const json* s = r.get("seed")) {
    if (!s->is_number_integer()) throw bad_request("\"seed\" must be an integer", "seed");
    p.seed = s->is_number_unsigned() ? s->get<uint64_t>() : static_cast<uint64_t>(s->get<int64_t>());
  }
  read_stop(r, limits, p);
  p.stream = r.boolean("stream").value_or(false);
  if (const json* so = r.get("stream_options")) {
    if (!p.stream) throw bad_request("\"stream_options\" is only allowed with \"stream\": true", "stream_options");
    ObjectReader o(*so, "stream_options");
    p.include_usage = o.boolean("include_usage").value_or(false);
    o.done();
  }
  r.only("n", 1, "only n = 1 is supported");
  r.only("presence_penalty", 0, "penalties are not supported (only 0)");
  r.only("frequency_penalty", 0, "penalties are not supported (only 0)");
  r.only("logit_bias", json::object(), "logit_bias is not supported");
  r.string("user", 256);  // accepted and ignored (never logged)
}

int64_t read_max_tokens(ObjectReader& r, const std::string& key, const ApiLimits& limits) {
  const json* v = r.get(key);
  if (!v) return -1;
  if (!v->is_number_integer()) throw bad_request("\"" + key + "\" must be an integer", key);
  if (!in_range(*v, 1, limits.max_tokens_cap))
    throw bad_request("\"" + key + "\" must be between 1 and " + std::to_string(limits.max_tokens_cap) +
                          " (the server's --max-tokens)",
                      key);
  return v->get<int64_t>();
}

}  // namespace

CompletionRequest parse_completion_request(const json& body, const ApiLimits& limits) {
  CompletionRequest req;
  ObjectReader r(body, "request body");
  req.model = r.string("model", kMaxModelName).value_or("");
  const json* prompt = r.get("prompt");
  if (!prompt) throw bad_request("\"prompt\" is required", "prompt");
  if (prompt->is_string()) {
    req.prompt = prompt->get<std::string>();
  } else if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
    req.prompt = (*prompt)[0].get<std::string>();
  } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number_integer()) {
    for (const json& id : *prompt) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > std::numeric_limits<int32_t>::max())
        throw bad_request("\"prompt\" as token ids must be an array of non-negative integers", "prompt");
      req.prompt_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  } else if (prompt->is_array() && prompt->size() > 1) {
    throw bad_request("one prompt per request: send the prompts of a batch as separate requests", "prompt");
  } else {
    throw bad_request("\"prompt\" must be a string or an array of token ids", "prompt");
  }
  const int64_t max_tokens = read_max_tokens(r, "max_tokens", limits);
  if (max_tokens > 0) req.sampling.max_tokens = max_tokens;
  read_common(r, limits, req.sampling);
  if (auto lp = r.integer("logprobs", 0, limits.max_logprobs)) req.sampling.logprobs = static_cast<int>(*lp);
  r.only("echo", false, "echo is not supported");
  r.only("best_of", 1, "only best_of = 1 is supported");
  r.only("suffix", json(nullptr), "suffix (insertion) is not supported");
  r.done();
  return req;
}

ChatRequest parse_chat_request(const json& body, const ApiLimits& limits) {
  ChatRequest req;
  ObjectReader r(body, "request body");
  req.model = r.string("model", kMaxModelName).value_or("");
  const json* messages = r.get("messages");
  if (!messages) throw bad_request("\"messages\" is required", "messages");
  if (!messages->is_array() || messages->empty())
    throw bad_request("\"messages\" must be a non-empty array of {\"role\", \"content\"}", "messages");
  if (messages->size() > limits.max_messages)
    throw bad_request("at most " + std::to_string(limits.max_messages) + " messages are allowed", "messages");
  for (size_t i = 0; i < messages->size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    ObjectReader m((*messages)[i], where);
    ChatMessage msg;
    msg.role = m.string("role", 32, /*required=*/true).value();
    if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for the system turn
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant")
      throw bad_request("\"" + where + ".role\" must be system, user or assistant (tools are not supported)",
                        where + ".role");
    const json* content = m.get("content");
    if (!content) throw bad_request("\"" + where + ".content\" is required", where + ".content");
    if (content->is_string()) {
      msg.content = content->get<std::string>();
    } else if (content->is_array()) {
      // Content parts: text only.
      for (size_t k = 0; k < content->size(); ++k) {
        ObjectReader part((*content)[k], where + ".content[" + std::to_string(k) + "]");
        const std::string type = part.string("type", 32, true).value();
        if (type != "text")
          throw bad_request("\"" + part.name("type") + "\" must be \"text\" (other content is not supported)",
                            part.name("type"));
        msg.content += part.string("text", std::string::npos, true).value();
        part.done();
      }
    } else {
      throw bad_request("\"" + where + ".content\" must be a string or an array of text parts", where + ".content");
    }
    m.string("name", 256);  // accepted, not used
    m.done();
    req.messages.push_back(std::move(msg));
  }
  const int64_t a = read_max_tokens(r, "max_tokens", limits);
  const int64_t b = read_max_tokens(r, "max_completion_tokens", limits);
  if (a > 0 && b > 0 && a != b)
    throw bad_request("give max_tokens or max_completion_tokens, not both", "max_completion_tokens");
  if (a > 0 || b > 0) req.sampling.max_tokens = std::max(a, b);
  read_common(r, limits, req.sampling);
  const bool logprobs = r.boolean("logprobs").value_or(false);
  const auto top = r.integer("top_logprobs", 0, limits.max_logprobs);
  if (top && !logprobs) throw bad_request("\"top_logprobs\" needs \"logprobs\": true", "top_logprobs");
  if (logprobs) req.sampling.logprobs = static_cast<int>(top.value_or(0));
  if (const json* rf = r.get("response_format")) {
    ObjectReader f(*rf, "response_format");
    if (f.string("type", 32, true).value() != "text")
      throw bad_request("\"response_format.type\" must be \"text\" (JSON modes are not supported)", "response_format");
    f.done();
  }
  for (const char* key : {"tools", "tool_choice", "functions", "function_call"}) {
    if (r.get(key)) throw bad_request(std::string("\"") + key + "\": tool calls are not supported", key);
  }
  r.done();
  return req;
}

}  // namespace bioquant::serve
