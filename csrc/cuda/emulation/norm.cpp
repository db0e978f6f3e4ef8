// The host emulation build of csrc/cuda/norm.cu (README.md here).
#include "../norm.cu"
