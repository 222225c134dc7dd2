/*
 * memdirty: a memory load for live-migration tests. It keeps a working set of W MiB and
 * writes to every 4 KiB page of it, pass after pass, at R MiB/s (0 = as fast as it can),
 * so the migration sees a known dirty rate over a known working set.
 *
 *   memdirty MIB RATE [STATUS_FILE]
 *
 * Every ~200 ms it replaces STATUS_FILE with a JSON line: running, passes, MiB dirtied,
 * the achieved rate over the last interval and overall. SIGTERM/SIGINT end it cleanly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MIB (1024.0 * 1024.0)
#define STATUS_INTERVAL 0.2
/* Pages written between clock checks: small enough to pace 1 MiB/s smoothly. */
#define BATCH_PAGES 16

struct state {
    const char *status_path;
    size_t mib;
    double rate;
    uint64_t passes, pages;
    double started, last_status, last_rate, window_t0;
    uint64_t window_pages0;
    int running;
    char error[128];
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double pages_mib(uint64_t pages)
{
    return (double)pages * PAGE / MIB;
}

/* Written to a temporary file and renamed, so the status CGI never reads half a file. */
static void write_status(struct state *s)
{
    char tmp[512];
    double now = now_mono();
    double elapsed = now - s->started;
    if (!s->status_path)
        return;
    if (now > s->window_t0) {
        s->last_rate = pages_mib(s->pages - s->window_pages0) / (now - s->window_t0);
        s->window_t0 = now;
        s->window_pages0 = s->pages;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp", s->status_path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fprintf(f,
            "{\"running\":%s,\"pid\":%d,\"working_set_mib\":%zu,\"target_rate_mibps\":%g,"
            "\"passes\":%llu,\"mib_dirtied\":%.2f,\"rate_mibps\":%.2f,"
            "\"avg_rate_mibps\":%.2f,\"elapsed\":%.3f,\"error\":\"%s\"}\n",
            s->running ? "true" : "false", (int)getpid(), s->mib, s->rate,
            (unsigned long long)s->passes, pages_mib(s->pages), s->last_rate,
            elapsed > 0 ? pages_mib(s->pages) / elapsed : 0.0, elapsed, s->error);
    fclose(f);
    rename(tmp, s->status_path);
    s->last_status = now;
}

static void sleep_until(double t)
{
    double d = t - now_mono();
    if (d <= 0)
        return;
    struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
    nanosleep(&ts, NULL);
}

/* Holds the writer to the target rate against an absolute schedule. Debt is capped at
 * half a second so that a stalled guest (throttled or paused by a migration) resumes at
 * the target rate instead of racing to catch up and skewing the dirty rate. */
static void pace(struct state *s, double *t0, uint64_t *p0)
{
    for (;;) {
        double now = now_mono();
        if (now - s->last_status >= STATUS_INTERVAL)
            write_status(s);
        if (s->rate <= 0 || stop_requested)
            return;
        double due = *t0 + pages_mib(s->pages - *p0) / s->rate;
        if (now - due > 0.5) {
            *t0 = now - 0.5;
            *p0 = s->pages;
            return;
        }
        if (due <= now)
            return;
        double until = due < now + STATUS_INTERVAL ? due : now + STATUS_INTERVAL;
        sleep_until(until);
    }
}

static void dirty_loop(struct state *s, unsigned char *mem, size_t npages)
{
    double t0 = now_mono();
    uint64_t p0 = 0;
    uint64_t stamp = 0;
    while (!stop_requested) {
        size_t i = 0;
        while (i < npages && !stop_requested) {
            size_t end = i + BATCH_PAGES < npages ? i + BATCH_PAGES : npages;
            /* A fresh value per page each pass, so every write really changes the page
             * (compression such as XBZRLE cannot skip it). */
            for (size_t p = i; p < end; p++) {
                stamp++;
                *(volatile uint64_t *)(mem + p * PAGE + (stamp % 64) * 8) = stamp;
            }
            s->pages += end - i;
            i = end;
            pace(s, &t0, &p0);
        }
        if (i >= npages)
            s->passes++;
    }
}

int main(int argc, char **argv)
{
    struct state s;
    memset(&s, 0, sizeof s);
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: memdirty MIB RATE [STATUS_FILE]\n");
        return 2;
    }
    long mib = atol(argv[1]);
    s.rate = atof(argv[2]);
    s.status_path = argc == 4 ? argv[3] : NULL;
    if (mib <= 0 || s.rate < 0) {
        fprintf(stderr, "memdirty: MIB must be > 0 and RATE >= 0\n");
        return 2;
    }
    s.mib = (size_t)mib;
    s.started = s.window_t0 = now_mono();
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    size_t npages = s.mib * 1024 * 1024 / PAGE;
    unsigned char *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        snprintf(s.error, sizeof s.error, "mmap %zu MiB: %s", s.mib, strerror(errno));
        write_status(&s);
        fprintf(stderr, "memdirty: %s\n", s.error);
        return 1;
    }
    s.running = 1;
    write_status(&s);
    dirty_loop(&s, mem, npages);
    s.running = 0;
    write_status(&s);
    return 0;
}
