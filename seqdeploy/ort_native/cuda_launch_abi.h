// The CUDA driver's extensible launch (cuLaunchKernelEx) as the library calls it, declared here
// because the library builds without a CUDA toolkit. These mirror CUlaunchAttribute and
// CUlaunchConfig of cuda.h (CUDA 12.0 on): tests/test_ort.py compiles static_asserts of their
// sizes and offsets against the toolkit's cuda.h where one is installed.
#pragma once

namespace seqdeploy {
namespace abi {

constexpr int kLaunchAttributeClusterDimension = 4;     // CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
constexpr int kLaunchAttributeClusterScheduling = 5;    // ..._CLUSTER_SCHEDULING_POLICY_PREFERENCE
constexpr int kClusterSchedulingSpread = 1;             // CU_CLUSTER_SCHEDULING_POLICY_SPREAD

struct ClusterDim {
  unsigned x, y, z;
};

// CUlaunchAttributeValue: a 64-byte union holding pointers (8-byte aligned)
union LaunchAttributeValue {
  char pad[64];
  void* align;
  ClusterDim cluster_dim;
  int scheduling_policy;
};

struct LaunchAttribute {            // CUlaunchAttribute
  int id;                           // CUlaunchAttributeID (an enum)
  char pad[4];
  LaunchAttributeValue value;
};

struct LaunchConfig {               // CUlaunchConfig
  unsigned grid_x, grid_y, grid_z;
  unsigned block_x, block_y, block_z;
  unsigned shared_bytes;
  void* stream;                     // CUstream
  LaunchAttribute* attrs;
  unsigned n_attrs;
};

}  // namespace abi
}  // namespace seqdeploy
