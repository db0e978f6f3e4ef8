// The host emulation build of csrc/cuda/ops.cpp, the tensor side of the kernel ops (README.md here).
#include "../ops.cpp"
