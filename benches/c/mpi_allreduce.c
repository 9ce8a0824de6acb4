/* MPI_Allreduce (MPI_FLOAT, MPI_SUM, out of place) timed as `concord bench` times itself: after a
 * barrier, each iteration's time is the slowest rank's; prints the median and the busbw
 * (nccl-tests' factor 2(n-1)/n, GB = 1e9 bytes).
 * Usage: mpirun -np N mpi_allreduce BYTES [ITERS] [WARMUP]
 * Prints: mpi N BYTES median_us algbw_GBps busbw_GBps */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, n;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  long bytes = argc > 1 ? atol(argv[1]) : 1 << 28;
  int iters = argc > 2 ? atoi(argv[2]) : 8;
  int warmup = argc > 3 ? atoi(argv[3]) : 2;
  long count = bytes / 4;
  float *src = malloc(count * sizeof(float)), *dst = malloc(count * sizeof(float));
  double *times = malloc(iters * sizeof(double));
  if (!src || !dst || !times) {
    fprintf(stderr, "out of memory for %ld bytes\n", bytes);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (long i = 0; i < count; i++) src[i] = (float)((i + rank) % 7);
  for (int it = -warmup; it < iters; it++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    MPI_Allreduce(src, dst, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double t = MPI_Wtime() - t0, slowest;
    MPI_Allreduce(&t, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= 0) times[it] = slowest;
  }
  if (rank == 0) {
    qsort(times, iters, sizeof(double), cmp);
    double med = times[iters / 2];
    double algbw = bytes / med / 1e9;
    printf("mpi %d %ld %.1f %.3f %.3f\n", n, bytes, med * 1e6, algbw, algbw * 2.0 * (n - 1) / n);
  }
  free(src);
  free(dst);
  free(times);
  MPI_Finalize();
  return 0;
}
