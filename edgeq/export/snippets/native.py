"""The C++, CMake and Kotlin sources an integration bundle ships, as text.

Kept in a Python module (not loose ``.cpp`` / ``.kt`` files) so they travel with every install of
the package. None of them is compiled by the test suite; the llama.cpp program was built and run
against llama-cpp-python 0.3.36's ``llama.h`` / ``libllama.so`` when written (same ids as the Python
snippet). Each is a greedy decoding loop over the artifact's KV cache, like the Python snippets.
"""

from __future__ import annotations

ORT_CPP = r"""// Greedy decoding with an edgeq ONNX export through the ONNX Runtime C/C++ API.
//
// Build: see CMakeLists.txt (ONNXRUNTIME_ROOT = an extracted onnxruntime release, same version as
// the one in ../python/requirements.txt). Run with the prompt's token ids (get them with
// `python ../python/run_onnxruntime.py --json --prompt "..."`, field prompt_ids):
//   ./edgeq_greedy ../model/model.onnx 32 464 2068 7586
// Prints the generated token ids; decode them with the bundle's tokenizer.json.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

struct CacheSlot {
  std::string past_name;  // past_key_values.{layer}.{key|value}
  size_t present_index;   // where present.{layer}.{key|value} sits among the outputs
  std::vector<int64_t> empty_shape;  // (1, kv heads, 0, head dim)
  ONNXTensorElementDataType type;    // float or float16 (fp16 exports)
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx N_NEW TOKEN_ID [TOKEN_ID ...]\n";
    return 2;
  }
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "edgeq");
  Ort::SessionOptions options;
  Ort::Session session(env, argv[1], options);  // Windows: pass a wide string (ORTCHAR_T)
  const int n_new = std::stoi(argv[2]);
  std::vector<int64_t> step_ids;
  for (int i = 3; i < argc; ++i) step_ids.push_back(std::stoll(argv[i]));

  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> outputs;
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    outputs.push_back(session.GetOutputNameAllocated(i, allocator).get());
  std::vector<CacheSlot> cache;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    std::string name = session.GetInputNameAllocated(i, allocator).get();
    if (name.rfind("past_key_values.", 0) != 0) continue;
    Ort::TypeInfo type_info = session.GetInputTypeInfo(i);  // owns what info points into
    auto info = type_info.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = info.GetShape();
    shape[0] = 1;
    shape[2] = 0;
    std::string present = "present." + name.substr(std::string("past_key_values.").size());
    size_t index = std::find(outputs.begin(), outputs.end(), present) - outputs.begin();
    if (index == outputs.size()) {
      std::cerr << "error: the graph has " << name << " but no " << present << " output; re-export with edgeq\n";
      return 1;
    }
    cache.push_back({name, index, shape, info.GetElementType()});
  }
  std::vector<Ort::Value> past;
  for (auto& slot : cache)
    past.push_back(Ort::Value::CreateTensor(allocator, slot.empty_shape.data(), 4, slot.type));

  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<const char*> output_names;
  for (auto& n : outputs) output_names.push_back(n.c_str());
  int64_t n_past = 0;
  for (int generated = 0; generated < n_new; ++generated) {
    const int64_t n = static_cast<int64_t>(step_ids.size());
    std::vector<int64_t> mask(n_past + n, 1), positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = n_past + i;
    const int64_t ids_shape[2] = {1, n}, mask_shape[2] = {1, n_past + n};
    std::vector<const char*> names = {"input_ids", "attention_mask", "position_ids"};
    std::vector<Ort::Value> inputs;
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, step_ids.data(), n, ids_shape, 2));
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, mask.data(), mask.size(), mask_shape, 2));
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, positions.data(), n, ids_shape, 2));
    for (size_t i = 0; i < cache.size(); ++i) {
      names.push_back(cache[i].past_name.c_str());
      inputs.push_back(std::move(past[i]));
    }
    auto results = session.Run(Ort::RunOptions{nullptr}, names.data(), inputs.data(), inputs.size(),
                               output_names.data(), output_names.size());
    // logits (1, n, vocab), float32 (edgeq keeps logits float32 in every precision)
    auto logits_shape = results[0].GetTensorTypeAndShapeInfo().GetShape();
    const int64_t vocab = logits_shape[2];
    const float* last = results[0].GetTensorData<float>() + (n - 1) * vocab;
    const int64_t next = std::max_element(last, last + vocab) - last;
    std::cout << next << (generated + 1 < n_new ? " " : "\n") << std::flush;
    for (size_t i = 0; i < cache.size(); ++i) past[i] = std::move(results[cache[i].present_index]);
    n_past += n;
    step_ids = {next};
  }
  return 0;
}
"""

ORT_CMAKE = r"""cmake_minimum_required(VERSION 3.16)
project(edgeq_greedy CXX)
set(CMAKE_CXX_STANDARD 17)
# An extracted onnxruntime release (github.com/microsoft/onnxruntime/releases: onnxruntime-<os>-<arch>-<version>)
set(ONNXRUNTIME_ROOT "" CACHE PATH "onnxruntime release folder (include/ and lib/)")
if(NOT ONNXRUNTIME_ROOT)
  message(FATAL_ERROR "set -DONNXRUNTIME_ROOT=/path/to/onnxruntime-<os>-<arch>-<version>")
endif()
add_executable(edgeq_greedy main.cpp)
target_include_directories(edgeq_greedy PRIVATE ${ONNXRUNTIME_ROOT}/include)
find_library(ONNXRUNTIME_LIB onnxruntime PATHS ${ONNXRUNTIME_ROOT}/lib REQUIRED NO_DEFAULT_PATH)
target_link_libraries(edgeq_greedy PRIVATE ${ONNXRUNTIME_LIB})
set_target_properties(edgeq_greedy PROPERTIES BUILD_RPATH ${ONNXRUNTIME_ROOT}/lib)
"""

LLAMA_CPP = r"""// Greedy decoding with an edgeq GGUF export through the llama.cpp C API (llama.h).
//
// Build: see CMakeLists.txt (LLAMA_INCLUDE_DIR / LLAMA_LIB_DIR: a llama.cpp build, or the
// include/ and llama_cpp/lib/ folders a llama-cpp-python install ships). Run:
//   ./edgeq_greedy ../model/MODEL.gguf 32 "The quick brown fox"
// Prints the generated text, then the generated token ids on a line starting with "ids:".
#include <llama.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf N_NEW PROMPT\n", argv[0]);
    return 2;
  }
  const int n_new = std::atoi(argv[2]);
  const std::string prompt = argv[3];
  llama_log_set(  // llama.cpp logs every load step to stderr; keep its errors only
      [](ggml_log_level level, const char* text, void*) {
        if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
      },
      nullptr);
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (model == nullptr) {
    std::fprintf(stderr, "error: cannot load %s; check the file against the manifest's sha256\n", argv[1]);
    return 1;
  }
  const llama_vocab* vocab = llama_model_get_vocab(model);
  // add_special=true: BOS only when the GGUF says the model wants it (tokenizer.ggml.add_bos_token)
  int n = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), nullptr, 0, true, false);
  std::vector<llama_token> tokens(n);
  llama_tokenize(vocab, prompt.c_str(), prompt.size(), tokens.data(), n, true, false);

  llama_context_params params = llama_context_default_params();
  params.n_ctx = tokens.size() + n_new;
  params.n_batch = params.n_ctx;
  llama_context* ctx = llama_init_from_model(model, params);
  const int n_vocab = llama_vocab_n_tokens(vocab);
  std::vector<llama_token> generated;
  llama_batch batch = llama_batch_get_one(tokens.data(), tokens.size());  // the prompt, then one token
  llama_token next = 0;
  while (static_cast<int>(generated.size()) < n_new) {
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "error: llama_decode failed at token %zu\n", generated.size());
      return 1;
    }
    const float* logits = llama_get_logits_ith(ctx, -1);  // the batch's last token
    next = 0;
    for (int v = 1; v < n_vocab; ++v)
      if (logits[v] > logits[next]) next = v;
    generated.push_back(next);
    char piece[256];
    const int len = llama_token_to_piece(vocab, next, piece, sizeof(piece), 0, false);
    if (len > 0) std::fwrite(piece, 1, len, stdout);
    batch = llama_batch_get_one(&next, 1);
  }
  std::printf("\nids:");
  for (llama_token t : generated) std::printf(" %d", t);
  std::printf("\n");
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
"""

LLAMA_CMAKE = r"""cmake_minimum_required(VERSION 3.16)
project(edgeq_greedy CXX)
set(CMAKE_CXX_STANDARD 17)
# A llama.cpp build (include/llama.h, libllama), or a llama-cpp-python install:
#   LLAMA_INCLUDE_DIR = <site-packages>/include, LLAMA_LIB_DIR = <site-packages>/llama_cpp/lib
set(LLAMA_INCLUDE_DIR "" CACHE PATH "folder with llama.h (and ggml.h)")
set(LLAMA_LIB_DIR "" CACHE PATH "folder with libllama")
if(NOT LLAMA_INCLUDE_DIR OR NOT LLAMA_LIB_DIR)
  message(FATAL_ERROR "set -DLLAMA_INCLUDE_DIR=... -DLLAMA_LIB_DIR=... (see main.cpp)")
endif()
add_executable(edgeq_greedy main.cpp)
target_include_directories(edgeq_greedy PRIVATE ${LLAMA_INCLUDE_DIR})
find_library(LLAMA_LIB llama PATHS ${LLAMA_LIB_DIR} REQUIRED NO_DEFAULT_PATH)
target_link_libraries(edgeq_greedy PRIVATE ${LLAMA_LIB})
set_target_properties(edgeq_greedy PROPERTIES BUILD_RPATH ${LLAMA_LIB_DIR})
"""

KOTLIN = r"""// Greedy decoding with an edgeq ONNX export on Android, with onnxruntime-android (ai.onnxruntime).
//
// Gradle (module build.gradle.kts):  see build.gradle.kts.txt beside this file.
// Copy ../model/ into the app (assets, then to filesDir: OrtSession needs a file path or the bytes).
// Token ids in, token ids out: tokenize with the bundle's tokenizer.json on the host
// (python/run_onnxruntime.py --json prints prompt_ids) or with a tokenizer library in the app.
package ai.edgeq.example

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import java.nio.ByteBuffer
import java.nio.LongBuffer

class EdgeqGreedy(modelPath: String) : AutoCloseable {
    private val env = OrtEnvironment.getEnvironment()
    private val session: OrtSession = env.createSession(modelPath, OrtSession.SessionOptions())
    private val pastNames = session.inputNames.filter { it.startsWith("past_key_values.") }

    private fun emptyCache(name: String): OnnxTensor {
        val info = session.inputInfo.getValue(name).info as TensorInfo
        val shape = longArrayOf(1, info.shape[1], 0, info.shape[3]) // (1, kv heads, 0, head dim)
        return OnnxTensor.createTensor(env, ByteBuffer.allocateDirect(0), shape, info.type) // FLOAT or FLOAT16
    }

    private fun longs(values: LongArray): OnnxTensor =
        OnnxTensor.createTensor(env, LongBuffer.wrap(values), longArrayOf(1, values.size.toLong()))

    /** The argmax token after [promptIds], [maxNewTokens] times (each fed back through the KV cache). */
    fun generate(promptIds: LongArray, maxNewTokens: Int): LongArray {
        val out = ArrayList<Long>()
        var step = promptIds
        var nPast = 0L
        var past: Map<String, OnnxTensor> = pastNames.associateWith { emptyCache(it) }
        var previous: OrtSession.Result? = null
        while (out.size < maxNewTokens) {
            val inputs = HashMap<String, OnnxTensor>(past)
            inputs["input_ids"] = longs(step)
            inputs["attention_mask"] = longs(LongArray((nPast + step.size).toInt()) { 1L })
            inputs["position_ids"] = longs(LongArray(step.size) { nPast + it })
            val result = session.run(inputs)
            val logits = (result.get("logits").get() as OnnxTensor).floatBuffer // (1, n, vocab) float32
            val vocab = (logits.capacity() / step.size)
            val base = (step.size - 1) * vocab
            var next = 0
            for (v in 1 until vocab) if (logits.get(base + v) > logits.get(base + next)) next = v
            out.add(next.toLong())
            listOf("input_ids", "attention_mask", "position_ids").forEach { inputs.getValue(it).close() }
            previous?.close() ?: past.values.forEach { it.close() } // the cache we just consumed
            past = pastNames.associateWith { result.get(it.replace("past_key_values.", "present.")).get() as OnnxTensor }
            previous = result
            nPast += step.size
            step = longArrayOf(next.toLong())
        }
        previous?.close()
        return out.toLongArray()
    }

    override fun close() {
        session.close()
    }
}
"""

GRADLE = """// module build.gradle.kts: onnxruntime-android, the same version that validated this export
dependencies {{
    implementation("com.microsoft.onnxruntime:onnxruntime-android:{ort_version}")
}}
"""

ANDROID_GGUF_README = """# Android (GGUF)

onnxruntime-android runs ONNX exports, not GGUF. A GGUF file runs on Android through llama.cpp
itself: build `../cpp/main.cpp` against llama.cpp with the Android NDK
(`cmake -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake -DANDROID_ABI=arm64-v8a ...`)
and call it through JNI, or run the binary over `adb shell` (`edgeq bench` does the latter).
For a Kotlin-only integration export ONNX (`edgeq export --format onnx --precision int4 --bundle`),
whose bundle carries a Kotlin example with onnxruntime-android.
"""
