// The host emulation build of csrc/cuda/softmax.cu (README.md here).
#include "../softmax.cu"
