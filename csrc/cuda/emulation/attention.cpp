// The host emulation build of csrc/cuda/attention.cu (README.md here).
#include "../attention.cu"
