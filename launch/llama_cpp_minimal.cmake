# Included by CMake right after llama.cpp's project() when launch/install.sh --test builds
# llama-cpp-python from source (CMAKE_PROJECT_llama.cpp_INCLUDE): llama-cpp-python forces llama.cpp's
# "common" utility library on (a cache variable), yet its Python bindings load only libllama and
# libggml. A normal variable of the same name shadows the cache entry in llama.cpp's scope (policy
# CMP0077), so common is neither compiled nor installed: about half of the build's CPU time.
set(LLAMA_BUILD_COMMON OFF)
