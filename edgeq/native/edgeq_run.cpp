// edgeq-run: the native runner of an edgeq GGUF bundle, for devices with nothing installed (Android, arm64 boards).
//
// Built statically (no dynamic loader, no libc on the device) over llama.cpp's llama.h, from the same llama.cpp
// sources llama-cpp-python vendors, so its numbers are the host runtime's (edgeq/native/runner.py builds it).
// The bundle is untrusted input: the manifest is read bounded and type-checked, and every artifact's size and
// SHA-256 are checked before llama.cpp opens anything. SHA-256 is Igor Pavlov's public-domain implementation that
// llama.cpp vendors (vendor/hash/sha256), JSON is nlohmann/json (MIT), also vendored by llama.cpp: nothing here is
// a hand-written parser or digest.
//
//   edgeq-run --bundle DIR --prompt TEXT [--chat] [--max-tokens N] [--threads N] [--n-ctx N] [--json]
//   edgeq-run --bundle DIR --json [--logits-out D]  the reference prompts: greedy ids per position, the greedy
//                                                   continuation, timings; D gets logits_<i>.npy (float32)
//   edgeq-run --bundle DIR --chat            chat on standard input, one user message a line
//   sampling (default greedy): --temperature T --top-k K --top-p P --min-p P --repeat-penalty R --seed S, drawn by
//   llama.cpp's sampler chain in the host runtime's order, so a seed gives the host's tokens
//   edgeq-run --bundle DIR --verify-only
//
// Exit status: 0 done, 2 refused (usage, a bundle that fails verification or needs what this runner lacks),
// 1 llama.cpp failed. Every refusal is one line on standard error naming the file.

#include "llama.h"

#include <nlohmann/json.hpp>

extern "C" {
#include "sha256/sha256.h"
}

#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#ifndef EDGEQ_VERSION
#define EDGEQ_VERSION "unknown"
#endif
#ifndef EDGEQ_LLAMA_CPP_VERSION
#define EDGEQ_LLAMA_CPP_VERSION "unknown"
#endif

using json = nlohmann::json;

namespace {

constexpr long long MAX_MANIFEST_BYTES = 64LL << 20;   // as runtime/manifest.py
constexpr long long MAX_REFERENCE_BYTES = 16LL << 20;
constexpr size_t MAX_ARTIFACTS = 10000;

struct Refused {
    std::string line;
};

[[noreturn]] void refuse(const std::string & file, const std::string & problem) {
    throw Refused{file.empty() ? problem : file + ": " + problem};
}

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Options {
    std::string bundle;
    std::string prompt;
    bool has_prompt = false;
    bool chat = false;
    bool json_out = false;
    bool verify_only = false;
    bool verbose = false;
    std::string logits_out;   // --json reference mode: logits_<i>.npy per prompt written here
    int max_tokens = -1;
    double pruning_rate = 0.0;
    // sampling, as edgeq's SamplingParams and in llama.cpp's order; the neutral value turns a step off
    double temperature = 0.0, top_p = 1.0, min_p = 0.0, repeat_penalty = 1.0;
    int top_k = 0, repeat_last_n = 64;
    long long seed = 0;
    int threads = 0;
    int n_ctx = 0;
};

const char * USAGE =
    "usage: edgeq-run --bundle DIR [--prompt TEXT] [--chat] [--max-tokens N] [--threads N] [--n-ctx N] [--json] "
    "[--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--repeat-last-n N] [--seed S] "
    "[--logits-out DIR] [--pruning-rate 0] [--verify-only] [--verbose]";

double parse_real(const std::string & flag, const char * v, double lo, double hi) {
    char * end = nullptr;
    double x = std::strtod(v, &end);
    if (end == v || *end || !(x >= lo && x <= hi)) {
        refuse("", flag + " takes a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not '" + v +
                       "'");
    }
    return x;
}

int parse_int(const std::string & flag, const char * v, int lo, int hi) {
    char * end = nullptr;
    errno = 0;
    long x = std::strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        refuse("", flag + " takes an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not '" +
                       v + "'");
    }
    return (int) x;
}

Options parse_args(int argc, char ** argv) {
    Options o;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> const char * {
            if (i + 1 >= argc) refuse("", a + " needs a value (" + USAGE + ")");
            return argv[++i];
        };
        if (a == "--bundle") o.bundle = value();
        else if (a == "--prompt") { o.prompt = value(); o.has_prompt = true; }
        else if (a == "--chat") o.chat = true;
        else if (a == "--json") o.json_out = true;
        else if (a == "--verify-only") o.verify_only = true;
        else if (a == "--verbose") o.verbose = true;
        else if (a == "--logits-out") o.logits_out = value();
        else if (a == "--pruning-rate") o.pruning_rate = parse_real(a, value(), 0.0, 0.999999);
        else if (a == "--temperature") o.temperature = parse_real(a, value(), 0.0, 100.0);
        else if (a == "--top-p") o.top_p = parse_real(a, value(), 0.0, 1.0);
        else if (a == "--min-p") o.min_p = parse_real(a, value(), 0.0, 1.0);
        else if (a == "--repeat-penalty") o.repeat_penalty = parse_real(a, value(), 0.0, 100.0);
        else if (a == "--top-k") o.top_k = parse_int(a, value(), 0, 1 << 24);
        else if (a == "--repeat-last-n") o.repeat_last_n = parse_int(a, value(), 0, 1 << 24);
        else if (a == "--seed") o.seed = parse_int(a, value(), 0, INT32_MAX);
        else if (a == "--max-tokens") o.max_tokens = parse_int(a, value(), 0, 1 << 20);
        else if (a == "--threads") o.threads = parse_int(a, value(), 1, 1024);
        else if (a == "--n-ctx") o.n_ctx = parse_int(a, value(), 1, 1 << 24);
        else if (a == "-h" || a == "--help") { std::puts(USAGE); std::exit(0); }
        else refuse("", "unknown option " + a + " (" + USAGE + ")");
    }
    if (o.bundle.empty()) refuse("", std::string("--bundle is required (") + USAGE + ")");
    return o;
}

// ---------------------------------------------------------------------------------------------------------------
// The manifest and the artifacts' checksums
// ---------------------------------------------------------------------------------------------------------------

std::string read_bounded(const std::string & path, long long limit, const std::string & what) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) refuse(path, "no " + what);
    if (!S_ISREG(st.st_mode)) refuse(path, what + " is not a regular file");
    if (st.st_size > limit) refuse(path, what + " is implausibly large");
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) refuse(path, "cannot open " + what);
    std::string s((size_t) st.st_size, '\0');
    size_t n = std::fread(s.data(), 1, s.size(), f);
    std::fclose(f);
    if (n != s.size()) refuse(path, "short read of " + what);
    return s;
}

json parse_json(const std::string & text, const std::string & path) {
    json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) refuse(path, "not valid JSON");
    return j;
}

// A manifest path as a key: relative, no "..", no NUL or backslash; "a//./b" is "a/b" (as PurePosixPath).
std::string normal_path(const std::string & rel, const std::string & manifest_path) {
    if (rel.empty() || rel.find('\0') != std::string::npos || rel.find('\\') != std::string::npos) {
        refuse(manifest_path, "artifact path '" + rel + "' is not a plain relative path");
    }
    if (rel[0] == '/') refuse(manifest_path, "artifact path '" + rel + "' escapes the bundle");
    std::string out;
    size_t i = 0;
    while (i <= rel.size()) {
        size_t j = rel.find('/', i);
        if (j == std::string::npos) j = rel.size();
        std::string part = rel.substr(i, j - i);
        if (part == "..") refuse(manifest_path, "artifact path '" + rel + "' escapes the bundle");
        if (!part.empty() && part != ".") out += (out.empty() ? "" : "/") + part;
        i = j + 1;
    }
    if (out.empty()) refuse(manifest_path, "artifact path '" + rel + "' is not a plain relative path");
    return out;
}

struct Artifact {
    std::string path;     // normalised, relative to the bundle
    std::string role;
    std::string backend;
    std::string sha256;
    long long bytes = 0;
    std::string kind;     // adapters: what they are
};

struct Bundle {
    std::string dir;
    std::string root;     // realpath of dir
    json manifest;
    std::vector<Artifact> artifacts;
};

bool is_hex64(const std::string & s) {
    return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
           });
}

Bundle read_manifest(const std::string & dir) {
    Bundle b;
    b.dir = dir;
    struct stat st;
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) refuse(dir, "not a bundle folder");
    char * real = realpath(dir.c_str(), nullptr);
    if (!real) refuse(dir, "not a bundle folder");
    b.root = real;
    std::free(real);
    const std::string mpath = dir + "/manifest.json";
    if (stat(mpath.c_str(), &st) != 0) refuse(dir, "no manifest.json (not an edgeq bundle, or an unfinished export)");
    b.manifest = parse_json(read_bounded(mpath, MAX_MANIFEST_BYTES, "manifest"), mpath);
    const json & m = b.manifest;
    if (!m.is_object() || !m.contains("format") || m["format"] != "edgeq-bundle") {
        refuse(mpath, "not an edgeq-bundle manifest");
    }
    if (!m.contains("version") || !m["version"].is_number_integer() || m["version"] != 1) {
        refuse(mpath, "unknown manifest version (this runner reads version 1)");
    }
    if (!m.contains("artifacts") || !m["artifacts"].is_array() || m["artifacts"].empty()) {
        refuse(mpath, "manifest lists no artifacts");
    }
    if (m["artifacts"].size() > MAX_ARTIFACTS) refuse(mpath, "manifest lists too many artifacts");
    std::set<std::string> seen;
    size_t i = 0;
    for (const json & a : m["artifacts"]) {
        const std::string at = "artifacts[" + std::to_string(i++) + "]";
        if (!a.is_object()) refuse(mpath, at + " is not an object");
        for (const char * key : {"path", "sha256", "backend"}) {
            if (!a.contains(key) || !a[key].is_string()) refuse(mpath, at + "." + key + " is missing or not a string");
        }
        if (a.contains("role") && !a["role"].is_string()) refuse(mpath, at + ".role is not a string");
        if (!a.contains("bytes") || !a["bytes"].is_number_integer() || a["bytes"].get<long long>() < 0) {
            refuse(mpath, at + ".bytes is missing or not a non-negative integer");
        }
        Artifact art;
        art.path = normal_path(a["path"].get<std::string>(), mpath);
        art.sha256 = a["sha256"].get<std::string>();
        if (!is_hex64(art.sha256)) refuse(mpath, at + ".sha256 is not a SHA-256 hex digest");
        art.bytes = a["bytes"].get<long long>();
        art.backend = a["backend"].get<std::string>();
        art.role = a.contains("role") ? a["role"].get<std::string>() : "model";
        art.kind = a.contains("kind") && a["kind"].is_string() ? a["kind"].get<std::string>() : "";
        if (!seen.insert(art.path).second) refuse(mpath, "artifact '" + art.path + "' is listed twice");
        b.artifacts.push_back(art);
    }
    if (!m.contains("model") || !m["model"].is_object() || !m["model"].contains("kind")) {
        refuse(mpath, "model.kind is missing");
    }
    return b;
}

// The file a manifest path names, refused when it resolves outside the bundle (a symbolic link pointing out).
std::string inside(const Bundle & b, const std::string & rel) {
    const std::string p = b.dir + "/" + rel;
    char * real = realpath(p.c_str(), nullptr);
    if (!real) refuse(p, "artifact listed in the manifest is missing");
    std::string r = real;
    std::free(real);
    if (r.compare(0, b.root.size() + 1, b.root + "/") != 0) {
        refuse(b.dir + "/manifest.json", "artifact path '" + rel + "' escapes the bundle");
    }
    return r;
}

std::string sha256_hex(const std::string & path, long long expect_bytes, long long & got_bytes) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) refuse(path, "cannot open the artifact");
    sha256_t h;
    sha256_init(&h);
    std::vector<unsigned char> buf(1 << 22);
    got_bytes = 0;
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
        sha256_update(&h, buf.data(), n);
        got_bytes += (long long) n;
        if (got_bytes > expect_bytes) break;      // longer than listed: no need to read the rest
    }
    std::fclose(f);
    unsigned char digest[SHA256_DIGEST_SIZE];
    sha256_final(&h, digest);
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : digest) {
        out += hex[c >> 4];
        out += hex[c & 15];
    }
    return out;
}

// Every artifact present, a regular file inside the bundle, of its size and SHA-256; before anything is loaded.
void verify(const Bundle & b) {
    for (const Artifact & a : b.artifacts) {
        const std::string shown = b.dir + "/" + a.path;
        const std::string p = inside(b, a.path);
        struct stat st;
        if (stat(p.c_str(), &st) != 0) refuse(shown, "artifact listed in the manifest is missing");
        if (!S_ISREG(st.st_mode)) refuse(shown, "artifact listed in the manifest is not a regular file");
        if ((long long) st.st_size != a.bytes) {
            refuse(shown, "checksum error: size " + std::to_string((long long) st.st_size) + " != " +
                              std::to_string(a.bytes) + " bytes in the manifest");
        }
        long long n = 0;
        if (sha256_hex(p, a.bytes, n) != a.sha256 || n != a.bytes) {
            refuse(shown, "checksum error: SHA-256 does not match the manifest");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// What the bundle asks of the runner
// ---------------------------------------------------------------------------------------------------------------

struct Plan {
    std::string model;                  // verified file paths
    std::vector<std::string> adapters;
    int n_ctx = 2048;
    int threads = 4;
    ggml_type kv = GGML_TYPE_F16;
    std::string kv_name = "f16";
};

// The physical cores this process may run on (its CPU affinity, SMT siblings once), from Linux's CPU topology, as
// runtime/threads.py counts them; the logical CPUs where the topology cannot be read.
int physical_cores() {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const bool masked = sched_getaffinity(0, sizeof(allowed), &allowed) == 0;
    const long n = std::min<long>(sysconf(_SC_NPROCESSORS_CONF), CPU_SETSIZE);
    std::set<std::string> cores;
    for (int cpu = 0; cpu < n; ++cpu) {
        if (masked && !CPU_ISSET(cpu, &allowed)) continue;
        const std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
        std::ifstream package(topo + "physical_package_id"), core(topo + "core_id");
        std::string a, b;
        if (package >> a && core >> b) cores.insert(a + ":" + b);
        else cores.insert("cpu" + std::to_string(cpu));
    }
    return std::max<int>(1, (int) cores.size());
}

// The threads without --threads, as the host runtime chooses them (runtime/threads.py): EDGEQ_THREADS, else the
// device profile's count (`auto`: every physical core), never more than the physical cores: llama.cpp's threads
// spin at each barrier, and a thread more than the cores (a 4-thread profile on a 2-core board) stalls every step.
int default_threads(const json & m, const std::string & mpath) {
    if (const char * env = std::getenv("EDGEQ_THREADS"); env && *env) {
        char * end = nullptr;
        errno = 0;
        const long n = std::strtol(env, &end, 10);
        if (errno || *end || n < 1 || n > 1024) refuse("EDGEQ_THREADS", std::string("'") + env +
                                                                            "' is not a thread count from 1 to 1024");
        return (int) n;
    }
    const int cores = physical_cores();
    if (!m.contains("target") || !m["target"].is_object() || !m["target"].contains("threads")) return cores;
    const json & t = m["target"]["threads"];
    if (t.is_string() && t.get<std::string>() == "auto") return cores;
    if (!t.is_number_integer() || t.get<long long>() < 1) refuse(mpath, "target.threads " + t.dump() +
                                                                          " is not a positive integer or \"auto\"");
    return (int) std::min<long long>(t.get<long long>(), cores);
}

Plan plan_for(const Bundle & b, const Options & o) {
    const json & m = b.manifest;
    const std::string mpath = b.dir + "/manifest.json";
    if (m["model"]["kind"] != "decoder") refuse(mpath, "edgeq-run runs decoders; this bundle holds a " +
                                                           m["model"]["kind"].dump());
    // a bundle exported with --pruning-rates holds the full model: it runs as it is (rate 0, as on the host);
    // another rate narrows the GGUF's MLPs at load, which edgeq's Python runtime does and this runner not yet
    if (o.pruning_rate != 0.0) {
        refuse(mpath, "--pruning-rate " + std::to_string(o.pruning_rate) + ": the native runner runs the full model "
                      "only (edgeq run --pruning-rate narrows it)");
    }
    Plan p;
    const Artifact * model = nullptr;
    std::string have;
    for (const Artifact & a : b.artifacts) {
        if (a.role == "model") {
            have += (have.empty() ? "" : ", ") + a.backend;
            if (a.backend == "gguf" && !model) model = &a;
        }
    }
    if (!model) refuse(mpath, "bundle has no gguf model (it has: " + (have.empty() ? "none" : have) + ")");
    p.model = inside(b, model->path);
    for (const Artifact & a : b.artifacts) {
        if (a.role != "adapter" || a.backend != "gguf") continue;
        if (a.kind.rfind("lora", 0) != 0) refuse(mpath, "adapter '" + a.path + "' is a " + a.kind +
                                                             ", which this runner cannot apply");
        p.adapters.push_back(inside(b, a.path));
    }
    if (m.contains("n_ctx") && m["n_ctx"].is_number_integer()) {
        long long n = m["n_ctx"].get<long long>();
        if (n <= 0 || n > (1 << 24)) refuse(mpath, "n_ctx " + std::to_string(n) + " is out of range");
        p.n_ctx = (int) n;
    }
    if (o.n_ctx) p.n_ctx = o.n_ctx;
    p.threads = default_threads(m, mpath);
    if (o.threads) p.threads = o.threads;
    if (m.contains("kv_cache_dtype") && m["kv_cache_dtype"].is_string()) {
        p.kv_name = m["kv_cache_dtype"].get<std::string>();
        if (p.kv_name == "f32") p.kv = GGML_TYPE_F32;
        else if (p.kv_name == "f16") p.kv = GGML_TYPE_F16;
        else if (p.kv_name == "q8_0") p.kv = GGML_TYPE_Q8_0;
        else refuse(mpath, "unsupported kv_cache_dtype '" + p.kv_name + "'");
    }
    return p;
}

// ---------------------------------------------------------------------------------------------------------------
// llama.cpp
// ---------------------------------------------------------------------------------------------------------------

struct Runner {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    const llama_vocab * vocab = nullptr;
    int n_vocab = 0;
    int n_ctx = 0;
    int n_batch = 0;
    int n_past = 0;

    ~Runner() {
        if (ctx) llama_free(ctx);
        if (model) llama_model_free(model);
    }

    void load(const Plan & p) {
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = 0;
        model = llama_model_load_from_file(p.model.c_str(), mp);
        if (!model) throw std::runtime_error("llama.cpp could not load " + p.model);
        vocab = llama_model_get_vocab(model);
        n_vocab = llama_vocab_n_tokens(vocab);
        // the host runtime's settings (runtime/gguf_backend.py through llama-cpp-python), so the numbers agree
        llama_context_params cp = llama_context_default_params();
        n_ctx = p.n_ctx;
        n_batch = std::min(p.n_ctx, 512);
        cp.n_ctx = (uint32_t) n_ctx;
        cp.n_batch = (uint32_t) n_batch;
        cp.n_ubatch = (uint32_t) n_batch;
        cp.n_threads = p.threads;
        cp.n_threads_batch = p.threads;
        cp.type_k = p.kv;
        cp.type_v = p.kv;
        // as the host: flash attention on f16 and q8_0 caches, the unfused attention on an f32 cache
        cp.flash_attn_type = p.kv == GGML_TYPE_F32 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
        cp.no_perf = false;
        ctx = llama_init_from_model(model, cp);
        if (!ctx) throw std::runtime_error("llama.cpp could not create a context for " + p.model);
        std::vector<llama_adapter_lora *> loras;
        for (const std::string & a : p.adapters) {
            llama_adapter_lora * l = llama_adapter_lora_init(model, a.c_str());
            if (!l) throw std::runtime_error("llama.cpp could not load the adapter " + a);
            loras.push_back(l);
        }
        if (!loras.empty()) {
            std::vector<float> scales(loras.size(), 1.0f);
            if (llama_set_adapters_lora(ctx, loras.data(), loras.size(), scales.data()) != 0) {
                throw std::runtime_error("llama.cpp could not apply the adapters");
            }
        }
    }

    void reset() {
        llama_memory_clear(llama_get_memory(ctx), true);
        n_past = 0;
    }

    // Append tokens; logits for every one of them (all) or the last; rows of n_vocab floats.
    std::vector<float> feed(const std::vector<llama_token> & ids, bool all) {
        if (n_past + (long long) ids.size() > n_ctx) {
            throw Refused{"context overflow: " + std::to_string(n_past + ids.size()) + " tokens > n_ctx " +
                          std::to_string(n_ctx)};
        }
        std::vector<float> out;
        llama_batch batch = llama_batch_init(n_batch, 0, 1);
        for (size_t start = 0; start < ids.size(); start += (size_t) n_batch) {
            const size_t n = std::min(ids.size() - start, (size_t) n_batch);
            batch.n_tokens = (int32_t) n;
            for (size_t k = 0; k < n; k++) {
                batch.token[k] = ids[start + k];
                batch.pos[k] = n_past + (llama_pos) k;
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = 0;
                batch.logits[k] = all || start + k + 1 == ids.size();
            }
            if (llama_decode(ctx, batch) != 0) {
                llama_batch_free(batch);
                throw std::runtime_error("llama_decode failed");
            }
            n_past += (int) n;
            for (size_t k = 0; k < n; k++) {
                if (!batch.logits[k]) continue;
                const float * row = llama_get_logits_ith(ctx, (int32_t) k);
                out.insert(out.end(), row, row + n_vocab);
            }
        }
        llama_batch_free(batch);
        return out;
    }

    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const {
        if (text.size() > (size_t) INT32_MAX / 2) throw Refused{"prompt too long"};
        std::vector<llama_token> ids(text.size() + 8);
        int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                               add_special, parse_special);
        if (n < 0) {
            ids.resize((size_t) -n);
            n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                               add_special, parse_special);
        }
        if (n < 0) throw std::runtime_error("tokenization failed");
        ids.resize((size_t) n);
        return ids;
    }

    std::string piece(llama_token t) const {
        char buf[256];
        int n = llama_token_to_piece(vocab, t, buf, sizeof buf, 0, false);
        if (n < 0) {
            std::string s((size_t) -n, '\0');
            n = llama_token_to_piece(vocab, t, s.data(), (int32_t) s.size(), 0, false);
            return s.substr(0, (size_t) std::max(n, 0));
        }
        return std::string(buf, (size_t) n);
    }

    int argmax(const float * row) const {
        return (int) (std::max_element(row, row + n_vocab) - row);
    }

    // The continuation after the tokens fed so far (`prompt`), whose last logits are `last`: greedy, or drawn by
    // `chain` (llama.cpp's sampler chain, as the host runtime builds it); stops at end-of-generation, at
    // max_tokens, or where the context is full (as the host's TokenStream).
    std::vector<llama_token> greedy(std::vector<float> last, int max_tokens, bool stream,
                                    llama_sampler * chain = nullptr, const std::vector<llama_token> & prompt = {}) {
        std::vector<llama_token> out;
        if (chain) {
            for (llama_token t : prompt) llama_sampler_accept(chain, t);    // penalties see the prompt too
        }
        while ((int) out.size() < max_tokens) {
            llama_token t = chain ? llama_sampler_sample(chain, ctx, -1) : argmax(last.data());
            if (llama_vocab_is_eog(vocab, t)) break;
            out.push_back(t);
            if (stream) {
                std::string s = piece(t);
                std::fwrite(s.data(), 1, s.size(), stdout);
                std::fflush(stdout);
            }
            if ((int) out.size() == max_tokens || n_past + 1 >= n_ctx) break;
            last = feed({t}, false);
        }
        return out;
    }
};

// llama.cpp's sampler chain for these settings, built as the host runtime builds it (runtime/gguf_backend.py's
// LlamaCppSampler): penalties, then greedy at temperature 0, else top-k, top-p, min-p, temperature and a seeded
// draw; nullptr when every setting is neutral (plain greedy: the argmax of the logits).
struct Chain {
    llama_sampler * chain = nullptr;
    Chain(const Options & o, int n_vocab) {
        const bool penalised = o.repeat_penalty != 1.0;
        if (o.temperature <= 0.0 && !penalised) return;
        chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        if (penalised) {
            llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, o.repeat_last_n,
                                                                         (float) o.repeat_penalty, 0.0f, 0.0f));
        }
        if (o.temperature <= 0.0) {
            llama_sampler_chain_add(chain, llama_sampler_init_greedy());
            return;
        }
        if (o.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(o.top_k));
        if (o.top_p < 1.0) llama_sampler_chain_add(chain, llama_sampler_init_top_p((float) o.top_p, 1));
        if (o.min_p > 0.0) llama_sampler_chain_add(chain, llama_sampler_init_min_p((float) o.min_p, 1));
        llama_sampler_chain_add(chain, llama_sampler_init_temp((float) o.temperature));
        llama_sampler_chain_add(chain, llama_sampler_init_dist((uint32_t) o.seed));
    }
    ~Chain() {
        if (chain) llama_sampler_free(chain);
    }
};

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

std::string chat_prompt(const Runner & r, const std::vector<llama_chat_message> & msgs, const std::string & mpath) {
    const char * tmpl = llama_model_chat_template(r.model, nullptr);
    if (!tmpl) refuse(mpath, "--chat: the model has no chat template");
    std::vector<char> buf(4096);
    int n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), true, buf.data(), (int32_t) buf.size());
    if (n > (int) buf.size()) {
        buf.resize((size_t) n);
        n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), true, buf.data(), (int32_t) buf.size());
    }
    if (n < 0) refuse(mpath, "--chat: the model's chat template is not one of llama.cpp's built-in templates "
                             "(edgeq run --chat renders it on a host)");
    return std::string(buf.data(), (size_t) n);
}

// A float32 array as NumPy's .npy (format 1.0), as the host runtime saves reference outputs.
void write_npy(const std::string & path, const float * data, size_t rows, size_t cols) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                         std::to_string(cols) + "), }";
    const size_t total = 10 + header.size() + 1;
    header += std::string((64 - total % 64) % 64, ' ') + "\n";
    FILE * f = std::fopen(path.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot write " + path);
    const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    const uint16_t hlen = (uint16_t) header.size();
    bool ok = std::fwrite(magic, 1, 8, f) == 8 && std::fwrite(&hlen, 2, 1, f) == 1 &&
              std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
              std::fwrite(data, sizeof(float), rows * cols, f) == rows * cols;
    ok = std::fclose(f) == 0 && ok;
    if (!ok) throw std::runtime_error("cannot write " + path);
}

// Peak resident memory, as the Python runner reports it: VmHWM, else getrusage (a root without /proc).
long long peak_rss_bytes() {
    long long kb = -1;
    if (FILE * f = std::fopen("/proc/self/status", "r")) {
        char line[256];
        while (std::fgets(line, sizeof line, f)) {
            if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::atoll(line + 6);
        }
        std::fclose(f);
    }
    if (kb < 0) {
        struct rusage ru;
        if (getrusage(RUSAGE_SELF, &ru) == 0) kb = ru.ru_maxrss;
    }
    return kb < 0 ? -1 : kb * 1024;
}

json timings(double prompt_ms, int n_prompt, double gen_ms, int n_gen) {
    return {{"prompt_tokens", n_prompt}, {"prompt_ms", prompt_ms},
            {"prompt_tokens_per_s", prompt_ms > 0 ? 1000.0 * n_prompt / prompt_ms : 0.0},
            {"generated_tokens", n_gen}, {"generate_ms", gen_ms},
            {"generate_tokens_per_s", gen_ms > 0 && n_gen > 1 ? 1000.0 * (n_gen - 1) / gen_ms : 0.0}};
}

// The bundle's reference prompts (reference/inputs.json, not covered by the checksums: only token ids are read,
// each bounded by the vocabulary and the context): per position the greedy id and the last position's top 5.
json reference(Runner & r, const Bundle & b, int max_tokens, const std::string & logits_out) {
    std::string folder = "reference";
    const json & m = b.manifest;
    if (m.contains("reference") && m["reference"].is_object() && m["reference"].contains("path") &&
        m["reference"]["path"].is_string()) {
        folder = normal_path(m["reference"]["path"].get<std::string>(), b.dir + "/manifest.json");
    }
    const std::string path = b.dir + "/" + folder + "/inputs.json";
    json in = parse_json(read_bounded(path, MAX_REFERENCE_BYTES, "reference inputs"), path);
    if (!in.is_object() || !in.contains("token_ids") || !in["token_ids"].is_array()) {
        refuse(path, "no token_ids list");
    }
    json out = json::array();
    size_t i = 0;
    for (const json & row : in["token_ids"]) {
        if (!row.is_array() || row.empty() || (int) row.size() > r.n_ctx) {
            refuse(path, "token_ids[" + std::to_string(i) + "] is not a list of 1 to n_ctx ids");
        }
        std::vector<llama_token> ids;
        for (const json & t : row) {
            if (!t.is_number_integer() || t.get<long long>() < 0 || t.get<long long>() >= r.n_vocab) {
                refuse(path, "token_ids[" + std::to_string(i) + "] holds an id outside the vocabulary");
            }
            ids.push_back((llama_token) t.get<long long>());
        }
        json rec = {{"token_ids", ids}};
        if (in.contains("prompts") && in["prompts"].is_array() && i < in["prompts"].size() &&
            in["prompts"][i].is_string()) {
            const std::string text = in["prompts"][i].get<std::string>();
            rec["prompt"] = text;
            rec["tokenized_ids_match"] = r.tokenize(text, true, false) == ids;
        }
        r.reset();
        double t0 = now_ms();
        std::vector<float> logits = r.feed(ids, true);
        double t1 = now_ms();
        if (!logits_out.empty()) {
            write_npy(logits_out + "/logits_" + std::to_string(i) + ".npy", logits.data(), ids.size(),
                      (size_t) r.n_vocab);
        }
        std::vector<int> am;
        for (size_t k = 0; k < ids.size(); k++) am.push_back(r.argmax(logits.data() + k * r.n_vocab));
        const float * last = logits.data() + (ids.size() - 1) * r.n_vocab;
        std::vector<int> order(r.n_vocab);
        for (int k = 0; k < r.n_vocab; k++) order[k] = k;
        const int top = std::min(5, r.n_vocab);
        std::partial_sort(order.begin(), order.begin() + top, order.end(),
                          [&](int x, int y) { return last[x] > last[y] || (last[x] == last[y] && x < y); });
        json topk = json::array();
        for (int k = 0; k < top; k++) topk.push_back({{"id", order[k]}, {"logit", last[order[k]]}});
        std::vector<float> last_row(last, last + r.n_vocab);
        std::vector<llama_token> gen = r.greedy(last_row, max_tokens, false);
        double t2 = now_ms();
        rec["argmax"] = am;
        rec["top5_last"] = topk;
        rec["greedy"] = gen;
        rec["timings"] = timings(t1 - t0, (int) ids.size(), t2 - t1, (int) gen.size());
        out.push_back(rec);
        i++;
    }
    return out;
}

int run(const Options & o) {
    double t0 = now_ms();
    Bundle b = read_manifest(o.bundle);
    verify(b);
    Plan p = plan_for(b, o);
    double t_verify = now_ms() - t0;
    if (o.verify_only) {
        std::printf("%s: %zu artifacts verified (SHA-256) in %.0f ms\n", o.bundle.c_str(), b.artifacts.size(),
                    t_verify);
        return 0;
    }
    if (!o.verbose) llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    Runner r;
    double t1 = now_ms();
    r.load(p);
    double t_load = now_ms() - t1;
    const std::string mpath = b.dir + "/manifest.json";
    const int max_tokens = o.max_tokens >= 0 ? o.max_tokens : (o.json_out && !o.has_prompt ? 16 : 128);

    json result = {{"runner", "edgeq-run"}, {"edgeq_version", EDGEQ_VERSION},
                   {"llama_cpp_python_version", EDGEQ_LLAMA_CPP_VERSION}, {"n_ctx", r.n_ctx}, {"threads", p.threads},
                   {"kv_cache_dtype", p.kv_name}, {"adapters", p.adapters.size()},
                   {"timings_ms", {{"verify", t_verify}, {"load", t_load}}}};

    if (o.chat && !o.has_prompt) {          // interactive: one user message a line, the whole chat re-rendered
        std::vector<std::string> turns;
        std::string line;
        while (std::fprintf(stderr, "> "), std::getline(std::cin, line)) {
            turns.push_back(line);
            std::vector<llama_chat_message> msgs;
            for (size_t k = 0; k < turns.size(); k++) {
                msgs.push_back({k % 2 ? "assistant" : "user", turns[k].c_str()});
            }
            std::vector<llama_token> ids = r.tokenize(chat_prompt(r, msgs, mpath), true, true);
            r.reset();
            Chain sampler(o, r.n_vocab);
            std::vector<llama_token> gen = r.greedy(r.feed(ids, false), max_tokens, true, sampler.chain, ids);
            std::string reply;
            for (llama_token t : gen) reply += r.piece(t);
            turns.push_back(reply);
            std::printf("\n");
        }
        return 0;
    }
    if (o.has_prompt) {
        std::string text = o.prompt;
        if (o.chat) text = chat_prompt(r, {{"user", o.prompt.c_str()}}, mpath);
        std::vector<llama_token> ids = r.tokenize(text, true, o.chat);
        if (ids.empty()) refuse("", "--prompt is empty after tokenization");
        r.reset();
        double a = now_ms();
        std::vector<float> last = r.feed(ids, false);
        double c = now_ms();
        Chain sampler(o, r.n_vocab);
        std::vector<llama_token> gen = r.greedy(last, max_tokens, !o.json_out, sampler.chain, ids);
        double d = now_ms();
        if (!o.json_out) {
            std::printf("\n");
            std::fprintf(stderr, "edgeq-run: prompt %zu tokens in %.0f ms, %zu tokens generated in %.0f ms "
                                 "(%d threads)\n", ids.size(), c - a, gen.size(), d - c, p.threads);
            return 0;
        }
        std::string s;
        for (llama_token t : gen) s += r.piece(t);
        result["generation"] = {{"prompt", o.prompt}, {"chat", o.chat}, {"prompt_ids", ids}, {"ids", gen},
                                {"sampling", {{"temperature", o.temperature}, {"top_k", o.top_k}, {"top_p", o.top_p},
                                              {"min_p", o.min_p}, {"repeat_penalty", o.repeat_penalty},
                                              {"repeat_last_n", o.repeat_last_n}, {"seed", o.seed}}},
                                {"text", s}, {"timings", timings(c - a, (int) ids.size(), d - c, (int) gen.size())}};
    }
    if (!o.json_out) refuse("", std::string("give --prompt TEXT, --chat or --json (") + USAGE + ")");
    if (!o.has_prompt) result["reference"] = reference(r, b, max_tokens, o.logits_out);
    result["peak_rss_bytes"] = peak_rss_bytes();
    std::printf("%s\n", result.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        return run(parse_args(argc, argv));
    } catch (const Refused & e) {
        std::fprintf(stderr, "edgeq-run: %s\n", e.line.c_str());
        return 2;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "edgeq-run: %s\n", e.what());
        return 1;
    }
}
