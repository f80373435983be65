// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: block-level change tracker for ferry's DR replication.
 *
 * Module init/exit. The hook is a probe on the block_bio_queue tracepoint.
 * That tracepoint's struct is not exported to modules, so it is found by
 * name with for_each_kernel_tracepoint() and attached with
 * tracepoint_probe_register(): both EXPORT_SYMBOL_GPL, the interface
 * out-of-tree tracers (LTTng) use. No kernel text or read-only data is
 * written. If the tracepoint is missing, or cannot be attached, the module
 * refuses to load: nothing is half-tracked.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/string.h>
#include <linux/tracepoint.h>

#include "cbt.h"

static struct tracepoint *ferry_tp;

static void ferry_match_tp(struct tracepoint *tp, void *priv)
{
	struct tracepoint **found = priv;

	if (!strcmp(tp->name, "block_bio_queue"))
		*found = tp;
}

static int __init ferry_cbt_init(void)
{
	int ret;

	for_each_kernel_tracepoint(ferry_match_tp, &ferry_tp);
	if (!ferry_tp) {
		pr_err("tracepoint block_bio_queue not found; not loading (nothing would be tracked)\n");
		return -ENOENT;
	}
	ret = tracepoint_probe_register(ferry_tp, (void *)ferry_hook_bio_queue, NULL);
	if (ret) {
		pr_err("cannot attach to tracepoint block_bio_queue (%d); not loading\n", ret);
		return ret;
	}
	ret = ferry_ctl_init();
	if (ret) {
		tracepoint_probe_unregister(ferry_tp, (void *)ferry_hook_bio_queue, NULL);
		tracepoint_synchronize_unregister();
		return ret;
	}
	pr_info("loaded: ABI %u, hook block_bio_queue, /dev/ferry-cbt\n", FERRY_CBT_ABI_VERSION);
	return 0;
}

static void __exit ferry_cbt_exit(void)
{
	/* No descriptor or mapping is left (each pins the module); disks may
	 * still be attached. Stop new opens, unpublish every disk, detach the
	 * probe, wait for probes still running, then free. */
	ferry_ctl_unregister();
	ferry_ctl_unpublish_all();
	tracepoint_probe_unregister(ferry_tp, (void *)ferry_hook_bio_queue, NULL);
	tracepoint_synchronize_unregister();
	ferry_ctl_release_unpublished();
	pr_info("unloaded\n");
}

module_init(ferry_cbt_init);
module_exit(ferry_cbt_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("ferry");
MODULE_DESCRIPTION("ferry block-level change tracker (block_bio_queue probe, shared record ring)");
MODULE_VERSION("0.1.0");
